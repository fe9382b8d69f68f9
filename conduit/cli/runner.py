"""Runs a command's coroutine and turns every expected failure into a one-line error and exit code.

The one-line rule holds for the unexpected too: a bug is one line naming the exception's type (its
message might quote a secret), and ``CONDUIT_LOG_LEVEL=DEBUG`` shows the traceback.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
import sys
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg
import click
import typer
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from conduit.cli.output import fail
from shared.errors import ConduitError, raised_by_database
from shared.logs import keep_secrets_out, trim_library_tracebacks
from shared.settings import Settings, log_level_name

T = TypeVar("T")

# errno values that mean "the server is not there", as opposed to a local file or port problem.
_UNREACHABLE = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                errno.ETIMEDOUT, errno.EHOSTDOWN, errno.ENETDOWN, errno.EPIPE}


# A command's own answers, passed through as they are (typer's Exit and Abort are RuntimeErrors, and
# typer vendors click: its ClickException, the base of usage errors, is reachable only this way).
_ANSWERS = (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException,
            next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))


def load_settings(*, use_running_stack: bool = True) -> Settings:
    """The settings; with ``use_running_stack`` (every command but `up` and `demo`), pointed at the
    stack `conduit up` runs from the state folder when no broker is configured."""
    from shared.kafka import with_running_stack

    try:
        settings = Settings()
    except ValidationError as exc:
        raise _bad_setting(exc) from None
    if not use_running_stack:
        return settings
    try:
        return with_running_stack(settings)
    except ConduitError as exc:
        raise fail(exc.message) from None


def _bad_setting(exc: ValidationError) -> typer.Exit:
    first = exc.errors()[0]
    message = first["msg"].removeprefix("Value error, ")   # our validators' messages name the variable
    if not first["loc"]:
        return fail(f"bad settings: {message}")
    where = ".".join(str(p) for p in first["loc"])
    variable = _env_variable(exc.title, str(first["loc"][0]))
    if variable is None or variable == where:
        return fail(f"bad setting {where}: {message}")
    return fail(f"bad setting {where} ({exc.title}) from {variable}: {message}")


def _env_variable(title: str, field: str) -> str | None:
    """The environment variable a settings class reads ``field`` from (users set variables, not fields)."""
    for cls in _settings_classes(BaseSettings):
        if cls.__name__ == title and field in cls.model_fields:
            alias = cls.model_fields[field].validation_alias
            if isinstance(alias, str):
                return alias
            return f"{cls.model_config.get('env_prefix', '')}{field}".upper()
    return None


def _settings_classes(base: type) -> list[type]:
    found = []
    for cls in base.__subclasses__():
        found += [cls, *_settings_classes(cls)]
    return found


def _os_error(exc: OSError) -> str:
    """An OSError in words that say what failed: a server out of reach, a port in use, a file."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror) or exc.errno in _UNREACHABLE or isinstance(exc, ConnectionError):
        return f"cannot reach a server: {reason}"
    if isinstance(exc, TimeoutError):   # asyncio's too, since Python 3.11
        return f"a server did not answer in time{': ' + str(exc) if str(exc) else ''}"
    if exc.errno == errno.EADDRINUSE:
        return f"a port is already in use: {reason}"
    if exc.filename is not None:
        return f"cannot use {exc.filename}: {reason}"
    return f"the system refused: {reason}"


def _database_error(exc: OSError) -> str:
    """A failure to reach the database, in words that name it and where it is (never a credential)."""
    # asyncio words a refused TCP connection "Connect call failed (host, port)": the errno says more.
    reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
    if isinstance(exc, TimeoutError):
        reason = f"no answer in time{': ' + str(exc) if str(exc) else ''}"
    where = _database_address()
    return f"cannot reach the database{' at ' + where if where else ''}: {reason}"


def _database_address() -> str | None:
    """Where DATABASE_URL points (host:port, or the Unix socket), without its user or password;
    None when it cannot be told safely (or the embedded database is used, named by the state folder)."""
    try:
        settings = Settings()
    except ValidationError:
        return None
    if settings.database_url is None:
        return f"{settings.state_dir / 'postgres'} (embedded)"
    url = settings.database_url.get_secret_value()
    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
    except ValueError:
        return None
    if "@" not in parts.netloc and "@" in url.partition("://")[2]:
        return None   # a '/', '?' or '#' in the password cut the URL short: its host part is not a host
    host = parts.netloc.rpartition("@")[2]
    socket_dir = query.get("host", [""])[0]
    if socket_dir.startswith("/"):
        port = query.get("port", [""])[0] or (host.rpartition(":")[2] if ":" in host else "") or "5432"
        return f"{socket_dir.rstrip('/')}/.s.PGSQL.{port}"
    return socket_dir or host or None


def _output_closed() -> bool:
    """Whether standard output's reader is gone (`conduit outbound list | head -1`): a BrokenPipeError
    is then ours to take quietly, not a server's connection broken (also an EPIPE)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):   # no file descriptor behind stdout, or no poll()
        return False


def _quiet_exit() -> typer.Exit:
    """End as a Unix tool whose reader went away does: no message, status 141 (128 + SIGPIPE, what a
    shell reports for a command SIGPIPE ended).  Standard output is pointed at /dev/null first, as
    Python's documentation of SIGPIPE advises, so the flush at exit does not fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return typer.Exit(141)


def _log_level() -> str:
    try:
        return log_level_name(os.environ.get("CONDUIT_LOG_LEVEL", "WARNING"))
    except ValueError as exc:
        raise fail(f"bad setting CONDUIT_LOG_LEVEL: {exc}") from None


def run(factory: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine; ConduitError and connection failures print one line and exit 2."""
    level = _log_level()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    keep_secrets_out()   # tokens and message bodies that exchangelib logs, Test & Enable included
    trim_library_tracebacks()   # asyncpg's pool, while the database is away
    if level != "DEBUG":
        # A broker it cannot reach is the command's one-line error (below), not aiokafka's log lines too.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return asyncio.run(factory())
    except _ANSWERS:
        raise
    except ConduitError as exc:
        raise fail(exc.message) from None
    except ValidationError as exc:   # a service's own settings (CONDUIT_DISPATCH_*, ...), read as it starts
        raise _bad_setting(exc) from None
    except OSError as exc:   # ConnectionError is one
        if isinstance(exc, BrokenPipeError) and _output_closed():
            raise _quiet_exit() from None
        raise fail(_database_error(exc) if raised_by_database(exc) else _os_error(exc)) from None
    except KafkaError as exc:
        raise fail(f"the Kafka broker failed: {exc}") from None
    except (asyncpg.OperatorInterventionError, asyncpg.TooManyConnectionsError) as exc:
        # 57P01-57P03 (starting up, shutting down) and 53300: the database, not the command, said no.
        where = _database_address()
        raise fail(f"the database{' at ' + where if where else ''} is not taking connections now "
                   f"({exc}); try again shortly") from None
    except asyncpg.PostgresError as exc:
        # Input the command's own checks let through: still one line, with PostgreSQL's reason.
        raise fail(f"the database refused the command: {exc}") from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a traceback unless asked
        if level == "DEBUG":
            raise
        raise fail(f"unexpected {type(exc).__name__} (a bug; CONDUIT_LOG_LEVEL=DEBUG shows where)") from None


def org_option() -> Any:
    return typer.Option("default", "--org", help="Organization name.", envvar="CONDUIT_ORG")
