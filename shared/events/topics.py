"""The topic catalogue: names, payload models, producers and consumers.

Each topic also has a documentation file ``docs/topics/<name>.md`` with examples that a test
validates against the model, and a dead-letter topic ``<name>.dlq``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from shared.events.envelope import Envelope
from shared.events.payloads import (
    ActivityCreatedV1,
    EmailOutboundV1,
    EmailReceivedV1,
    EmailStatusV1,
    MailboxEventV1,
    MailboxHealthV1,
    RegistryChangeV1,
)


@dataclass(frozen=True)
class Topic:
    name: str
    payload: type[BaseModel]
    schema_version: int
    key: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    description: str

    @property
    def envelope(self) -> type[Envelope[Any]]:
        return Envelope[self.payload]  # type: ignore[name-defined]

    @property
    def schema_name(self) -> str:
        return f"{self.name}.v{self.schema_version}"


EMAIL_RECEIVED = Topic(
    "email.received", EmailReceivedV1, 1, "mailbox id",
    ("ingest",), ("evaluate",),
    "A message pulled from a mailbox, its raw MIME already stored.",
)
ACTIVITY_CREATED = Topic(
    "activity.created", ActivityCreatedV1, 1, "organization id",
    ("evaluate", "dispatch"), ("external CRM",),
    "An email activity was recorded.",
)
EMAIL_OUTBOUND = Topic(
    "email.outbound", EmailOutboundV1, 1, "idempotency key",
    ("any system", "conduit send"), ("dispatch",),
    "A request to send an email through a mailbox.",
)
EMAIL_STATUS = Topic(
    "email.status", EmailStatusV1, 1, "idempotency key",
    ("dispatch",), ("the requesting system",),
    "Status of an outbound request: pending_send, sending, sent, failed or rejected.",
)
MAILBOX_EVENTS = Topic(
    "mailbox.events", MailboxEventV1, 1, "mailbox id",
    ("registry", "ingest", "dispatch", "exchange_sync"), ("monitoring", "external CRM"),
    "Mailbox lifecycle: created, tested, alerts, back-off and recovery.",
)
MAILBOX_HEALTH = Topic(
    "mailbox.health", MailboxHealthV1, 1, "mailbox id",
    ("evaluate",), ("monitoring",),
    "A mailbox's health after each change; the latest event per key is the current view (compacted).",
)
REGISTRY_CHANGES = Topic(
    "registry.changes", RegistryChangeV1, 1, "entity id",
    ("registry",), ("external CRM", "exchange_sync"),
    "A registry or CRM-side record was created, changed or deleted.",
)

TOPICS: dict[str, Topic] = {
    t.name: t for t in (EMAIL_RECEIVED, ACTIVITY_CREATED, EMAIL_OUTBOUND, EMAIL_STATUS, MAILBOX_EVENTS,
                        MAILBOX_HEALTH, REGISTRY_CHANGES)
}


def dead_letter(name: str) -> str:
    return f"{name}.dlq"
