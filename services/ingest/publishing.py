"""Store raw messages durably, then announce them on `email.received`.

The order is the guarantee: raw bytes committed -> events acknowledged by the broker -> sync state
advanced.  A crash between any two steps repeats the later ones (same bytes, same hash, events
deduplicated downstream), never loses a message.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple
from uuid import UUID

import asyncpg

from services.ingest import state
from services.ingest.received_events import ReceivedBatch
from shared.events.fields import is_email_address
from shared.events.topics import EMAIL_RECEIVED
from shared.kafka import Publisher
from shared.metrics import MESSAGES_INGESTED
from shared.mime import forwarder_address, from_address, generated_message_id, message_key
from shared.rawstore import raw_sha256, store_raw


# A batch of pulled messages also ends at this many bytes of raw mail (IMAP and POP3): batches of
# large messages (20 MB attachments) would otherwise hold gigabytes between the fetch and the store.
BATCH_BYTES = 32 * 1024 * 1024


# Pulled and Stored are made once per message: named tuples (~0.3 us each) rather than frozen
# dataclasses (~1.1 us: a frozen dataclass sets each field through object.__setattr__).
class Pulled(NamedTuple):
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
    # The replica whose lease fences what is recorded for the mailbox (``leases.hold``); None when
    # no leases are in play (a runner driven directly by a test or a benchmark).
    lease_holder: str | None = None


class Stored(NamedTuple):
    """A message whose raw bytes are committed and whose event is not yet published.

    ``key`` is what this mailbox records it as ingested under (``ingest_key``); ``message_id`` is
    the message's identity (``message_key``), the one its event carries.  ``size``: the stored raw
    bytes' length, for a message announced again without them (``item.raw`` empty); else None."""

    key: str
    sha256: str
    item: Pulled
    message_id: str
    forwarded_by: str | None
    size: int | None = None


def ingest_key(mailbox: Mailbox, raw: bytes) -> tuple[str, str, str | None]:
    """(ingest key, Message-ID key, forwarder) of one message as this mailbox receives it.

    The ingest key is the Message-ID key, except for a message a forward mailbox received from
    someone other than its author (redirected: RFC 5322 3.6.6 keeps the author's Message-ID): its
    key adds the forwarder's address, so each user's redirect of one message is published once,
    while the same copy found again (another folder, a new UIDVALIDITY, the next poll) is not.
    A Message-ID key holds no space, so the two kinds of key never collide.  Code that finds an
    ``ingested_message`` row again from the raw bytes (UIDVALIDITY renumbering) must key it here."""
    key = message_key(raw)
    if not mailbox.is_forward_mailbox:
        return key, key, None
    forwarder = forwarder_address(raw)
    if not forwarder or not is_email_address(forwarder):
        return key, key, None
    if forwarder == from_address(raw):
        return key, key, forwarder
    return f"{key} {forwarder}", key, forwarder


async def store_pulled(pool: asyncpg.Pool, mailbox: Mailbox, pulled: Sequence[Pulled],
                       claimed: set[str] | None = None) -> list[Stored]:
    """Store the raw bytes of the messages not yet ingested for this mailbox (committed on return).

    ``claimed`` holds the keys an earlier batch of the same sync has stored but not yet recorded as
    ingested: they are skipped, and this batch's new keys are added to it."""
    keyed: dict[str, tuple[Pulled, str, str | None]] = {}
    for item in pulled:
        key, message_id, forwarder = ingest_key(mailbox, item.raw)
        keyed.setdefault(key, (item, message_id, forwarder))  # the same message twice in one batch: once
    if claimed:
        keyed = {k: p for k, p in keyed.items() if k not in claimed}
    if not keyed:
        return []
    async with pool.acquire() as conn:
        seen = await state.already_ingested(conn, mailbox.id, list(keyed), lease_holder=mailbox.lease_holder)
        new = {k: p for k, p in keyed.items() if k not in seen}
        if not new:
            return []
        hashes = await store_raw(conn, [p.raw for p, _, _ in new.values()])
    if claimed is not None:
        claimed.update(new)
    return [Stored(key, sha, item, message_id, forwarder)
            for (key, (item, message_id, forwarder)), sha in zip(new.items(), hashes)]


async def announce_stored(publisher: Publisher, mailbox: Mailbox, source: str,
                          stored: Sequence[Stored], *, refiled: bool = False) -> list[state.IngestedMessage]:
    """Publish `email.received` for stored messages and wait for the broker's acknowledgements.
    ``refiled``: messages ingested before, announced again from another folder, to be filed under its
    folder-level tracking rule's record: their events say so (``refiled``), and they are not counted
    as ingested."""
    if not stored:
        return []
    batch = ReceivedBatch(mailbox.organization_id, mailbox.id, source)
    key = str(mailbox.id)
    events = []
    ingested = []
    for entry in stored:
        item = entry.item
        # forwarded_by: the user who forwarded it (From) or redirected it (Resent-From) to a forward
        # mailbox; evaluate attributes it to them.
        value = batch.encode(
            item.folder or "INBOX", item.uid, item.uidl, entry.sha256,
            len(item.raw) if entry.size is None else entry.size, entry.message_id,
            item.received_at, entry.forwarded_by, refiled=refiled,
        )
        events.append((EMAIL_RECEIVED.name, value, key))
        ingested.append(state.IngestedMessage(entry.key, entry.sha256, item.folder, item.uid, item.uidl))
    await publisher.publish_many(events)
    if not refiled:
        MESSAGES_INGESTED.labels(source).inc(len(events))
    return ingested


async def publish_pulled(pool: asyncpg.Pool, publisher: Publisher, mailbox: Mailbox, source: str,
                         pulled: Sequence[Pulled]) -> list[state.IngestedMessage]:
    """Store and publish the messages not yet ingested for this mailbox; return what was new."""
    return await announce_stored(publisher, mailbox, source, await store_pulled(pool, mailbox, pulled))


async def same_message(conn: asyncpg.Connection, mailbox_id: UUID,
                       found: Sequence[tuple[state.IngestedMessage, bytes]]) -> list[state.IngestedMessage]:
    """Of messages found under a key already ingested (with their raw bytes), those that are the
    ingested message delivered again: the same From, To, Cc, Date, Subject and body
    (``generated_message_id``, the identity of a message without a Message-ID).  Only those are
    further copies a queue may delete with it; another message that merely reuses the Message-ID (a
    scanner's fixed one, a forged one) is not.  Rare, so the ingested bytes are read back for them."""
    if not found:
        return []
    hashes = dict(await conn.fetch(
        "SELECT message_key, raw_sha256 FROM ingested_message WHERE mailbox_id = $1 AND message_key = ANY($2::text[])",
        mailbox_id, list({copy.message_key for copy, _ in found})))
    # The same bytes are the same message (a move, a renumbering: the usual case); only the others
    # are compared by what identifies them, reading the ingested bytes back.
    digests = [raw_sha256(raw) for _, raw in found]
    differing = [(copy, raw) for (copy, raw), digest in zip(found, digests)
                 if hashes.get(copy.message_key) not in (None, digest)]
    ingested: dict[str, str | None] = {}
    if differing:
        ingested = {r["message_key"]: generated_message_id(r["data"]) for r in await conn.fetch(
            """SELECT im.message_key, r.data FROM ingested_message im JOIN raw_message r ON r.sha256 = im.raw_sha256
               WHERE im.mailbox_id = $1 AND im.message_key = ANY($2::text[])""",
            mailbox_id, list({copy.message_key for copy, _ in differing}))}
    return [copy for (copy, raw), digest in zip(found, digests) if copy.message_key in hashes and (
        hashes[copy.message_key] == digest or ingested.get(copy.message_key) == generated_message_id(raw))]
