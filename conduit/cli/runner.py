"""Runs a command's coroutine and turns every expected failure into a one-line error and exit code."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Awaitable, Callable, TypeVar

import asyncpg
import typer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from conduit.cli.output import fail
from shared.errors import ConduitError
from shared.settings import Settings

T = TypeVar("T")


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise _bad_setting(exc) from None


def _bad_setting(exc: ValidationError) -> typer.Exit:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "settings"
    return fail(f"bad setting {where} ({exc.title}): {first['msg']}")


def run(factory: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine; ConduitError and connection failures print one line and exit 2."""
    level = os.environ.get("CONDUIT_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":
        # A broker it cannot reach is the command's one-line error (below), not aiokafka's log lines too.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return asyncio.run(factory())
    except ConduitError as exc:
        raise fail(exc.message) from None
    except ValidationError as exc:   # a service's own settings (CONDUIT_DISPATCH_*, ...), read as it starts
        raise _bad_setting(exc) from None
    except (ConnectionError, OSError) as exc:
        raise fail(f"cannot reach a server: {exc.strerror or exc}") from None
    except KafkaError as exc:
        raise fail(f"the Kafka broker failed: {exc}") from None
    except asyncpg.PostgresError as exc:
        # Input the command's own checks let through: still one line, with PostgreSQL's reason.
        raise fail(f"the database refused the command: {exc}") from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def org_option() -> Any:
    return typer.Option("default", "--org", help="Organization name.", envvar="CONDUIT_ORG")
