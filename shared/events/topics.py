"""The topic catalogue: names, payload models, producers and consumers.

Each topic also has a documentation file ``docs/topics/<name>.md`` with examples that a test
validates against the model, and a dead-letter topic ``<name>.dlq``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, Field, create_model

from shared.events.envelope import Envelope
from shared.events.payloads import (
    ActivityCreatedV1,
    ActivityUpdatedV1,
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
    # False for a consumer that checks the envelope itself, to answer the sender: dispatch tells a
    # requesting system, by its idempotency key, that its request was of a version it does not read.
    envelope_checked: bool = True

    @property
    def envelope(self) -> type[Envelope[Any]]:
        """The model an event on this topic must match: this topic's type and schema version and no
        other, and an ``event_id`` of the producer's (consumers deduplicate on it)."""
        if not self.envelope_checked:
            return Envelope[self.payload]  # type: ignore[name-defined]
        return _topic_envelope(self.name, self.payload, self.schema_version)

    def envelope_problem(self, event: Envelope[Any]) -> str | None:
        """Why an event decoded with an unchecked envelope is not one of this topic's, or None."""
        if event.type != self.name:
            return f"type: {event.type!r} is not {self.name!r}"
        if event.schema_version != self.schema_version:
            return f"schema_version: {event.schema_version} is not known here (this consumer reads v{self.schema_version})"
        if "event_id" not in event.model_fields_set:
            return "event_id: Field required"
        return None

    @property
    def schema_name(self) -> str:
        return f"{self.name}.v{self.schema_version}"


@functools.cache
def _topic_envelope(name: str, payload: type[BaseModel], version: int) -> type[Envelope[Any]]:
    # Without this, an event of another type, or of a version a consumer does not know, would be
    # read as this one whenever its fields happened to fit: a v2 request sent as if it were v1.
    # A breaking change publishes a new version beside this one (docs/topics), never in its place.
    return create_model(  # type: ignore[call-overload, no-any-return]
        f"{payload.__name__}Envelope",
        __base__=Envelope[payload],  # type: ignore[valid-type]
        event_id=(UUID, Field(description="Unique per event, chosen by its producer; consumers deduplicate on it.")),
        type=(Literal[name], Field(description=f"The event type: always '{name}' on this topic.")),
        schema_version=(Literal[version], Field(description=f"Version of the payload schema: {version}.")),
    )


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
ACTIVITY_UPDATED = Topic(
    "activity.updated", ActivityUpdatedV1, 1, "organization id",
    ("evaluate",), ("external CRM",),
    "An email activity's regarding record was changed by a folder-level tracking rule.",
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
    t.name: t for t in (EMAIL_RECEIVED, ACTIVITY_CREATED, ACTIVITY_UPDATED, EMAIL_OUTBOUND, EMAIL_STATUS, MAILBOX_EVENTS,
                        MAILBOX_HEALTH, REGISTRY_CHANGES)
}


def dead_letter(name: str) -> str:
    return f"{name}.dlq"
