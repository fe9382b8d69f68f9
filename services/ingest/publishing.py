"""Store raw messages durably, then announce them on `email.received`.

The order is the guarantee: raw bytes committed -> events acknowledged by the broker -> sync state
advanced.  A crash between any two steps repeats the later ones (same bytes, same hash, events
deduplicated downstream), never loses a message.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Sequence
from uuid import UUID

import asyncpg

from shared.events.envelope import Envelope, encode_event
from shared.events.payloads import EmailReceivedV1
from shared.events.topics import EMAIL_RECEIVED
from shared.kafka import Publisher
from shared.metrics import MESSAGES_INGESTED
from shared.mime import from_address, message_key
from shared.rawstore import store_raw
from services.ingest import state
from shared.events.fields import is_email_address


# Parametrised once: ``Envelope[...]`` looks its class up in pydantic's generic cache at every use.
EmailReceivedEvent = Envelope[EmailReceivedV1]


@dataclass(frozen=True)
class Pulled:
    """One message as it came off the server."""

    raw: bytes
    folder: str | None = None
    uid: int | None = None
    uidl: str | None = None
    received_at: datetime | None = None


@dataclass(frozen=True)
class Mailbox:
    id: UUID
    organization_id: UUID
    is_forward_mailbox: bool


async def publish_pulled(pool: asyncpg.Pool, publisher: Publisher, mailbox: Mailbox, source: str,
                         pulled: Sequence[Pulled]) -> list[state.IngestedMessage]:
    """Store and publish the messages not yet ingested for this mailbox; return what was new."""
    keyed = {}
    for item in pulled:
        keyed.setdefault(message_key(item.raw), item)  # the same message twice in one batch: once
    async with pool.acquire() as conn:
        seen = await state.already_ingested(conn, mailbox.id, list(keyed))
        new = {k: p for k, p in keyed.items() if k not in seen}
        if not new:
            return []
        hashes = await store_raw(conn, [p.raw for p in new.values()])
    events = []
    ingested = []
    for (key, item), sha in zip(new.items(), hashes):
        forwarded_by = from_address(item.raw) if mailbox.is_forward_mailbox else None
        event = EmailReceivedEvent(
            type=EMAIL_RECEIVED.name, schema_version=1, producer="ingest", organization_id=mailbox.organization_id,
            data=EmailReceivedV1(
                mailbox_id=mailbox.id, source=source, folder=item.folder or "INBOX", uid=item.uid, uidl=item.uidl,
                raw_sha256=sha, size=len(item.raw), message_id=key, received_at=item.received_at,
                forwarded_by=forwarded_by if forwarded_by and is_email_address(forwarded_by) else None,
            ),
        )
        events.append((EMAIL_RECEIVED.name, encode_event(event), str(mailbox.id)))
        ingested.append(state.IngestedMessage(key, sha, item.folder, item.uid, item.uidl))
    await publisher.publish_many(events)
    MESSAGES_INGESTED.labels(source).inc(len(events))
    return ingested
