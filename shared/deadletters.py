"""Dead letters: what a dead-letter topic holds, and replaying its events to the topic they came from.

Every consumer dead-letters the events it refuses (``shared.consumer``) on ``<topic>.dlq``, with
headers saying where each came from and why.  Once the cause is mended (a mailbox approved, a fix
deployed), ``replay`` publishes the same bytes with the same key to the original topic, with a
``replayed_from`` header naming the dead letter and a ``replayed_for`` header naming the consumer
group that refused it: the topic's other consumers handled the original and skip the replay
(``meant_for_another``), so nothing is counted twice.  The consumers are idempotent (one activity per
Message-ID, one send per idempotency key; a rejected key may be requested again), so replaying an
event twice, or one that was handled after all, changes nothing.

A replay is recorded in PostgreSQL (``dead_letter_replay``) after the broker acknowledged it, so
``list`` can say which dead letters were replayed and a second replay skips them.  A crash in
between leaves one unmarked, and the next replay publishes it again: harmless, as said.  An event
refused again is dead-lettered again, as a new dead letter carrying ``replayed_from``.

An outbox relay dead-letters too: an event larger than the producer or the broker takes, which no
topic can hold, stays in the outbox, and its dead letter stands for it (``kept_in_outbox``).  Its
replay puts the event back in the outbox's queue (``shared.outbox.release_set_aside``) instead of
publishing the stand-in.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel, Field

from shared.errors import InvalidInput, TransientError
from shared.events.topics import EMAIL_RECEIVED, TOPICS, dead_letter
from shared.kafka import Publisher, client_options, topic_name
from shared.outbox import KEPT_IN, KEPT_IN_HEADER, release_set_aside
from shared.settings import Settings

REPLAYED_FROM = "replayed_from"   # header on a replayed event, carried onto its dead letter if refused again
REPLAYED_FOR = "replayed_for"     # the consumer group that refused it: the others handled the original
_IDLE_POLLS = 15                  # one-second polls without a record before reading gives up


class DeadLetter(BaseModel):
    """One refused event as its dead-letter topic holds it."""

    topic: str = Field(description="the topic it was refused on (logical name)")
    partition: int
    offset: int
    logged_at: datetime = Field(description="when it was dead-lettered (the broker's timestamp)")
    reason: str
    error: str
    consumer_group: str | None = None
    original_partition: int | None = None
    original_offset: int | None = None
    key: str | None = None
    event_type: str | None = None
    event_id: str | None = None
    organization_id: str | None = None
    subject: str | None = Field(None, description="what the event is about: an idempotency key, a Message-ID")
    replay_of: str | None = Field(None, description="the dead letter this event was a replay of, if it was one")
    replayed_at: datetime | None = None
    kept_in_outbox: bool = Field(False, description="an event too large for the broker, kept in the outbox: "
                                                    "this dead letter stands for it, and its replay queues it again")
    content_left_out: int | None = Field(None, description="the event's size, when it was too large for the "
                                                           "dead-letter topic: it stays on its own topic, at the "
                                                           "original place, and cannot be replayed from here")
    value: bytes = Field(b"", exclude=True, repr=False)
    raw_key: bytes | None = Field(None, exclude=True, repr=False)   # replayed as it was, so to the same partition

    @property
    def at(self) -> str:
        """Its place on the dead-letter topic, as the commands name it: ``PARTITION:OFFSET``."""
        return f"{self.partition}:{self.offset}"


def dead_letter_topics(topic: str | None) -> list[str]:
    """The topics whose dead letters are meant (logical names); a clear error for an unknown one."""
    if topic is None:
        return list(TOPICS)
    if topic.endswith(".dlq"):
        topic = topic.removesuffix(".dlq")
    if topic not in TOPICS:
        raise InvalidInput(f"no topic {topic!r}: choose from {', '.join(TOPICS)}", reason="unknown_topic")
    return [topic]


async def read(settings: Settings, pool: asyncpg.Pool, topic: str, *,
               keep: Callable[[DeadLetter], bool] | None = None, values: bool = False) -> list[DeadLetter]:
    """The dead letters of ``topic`` up to now that ``keep`` accepts (all by default), oldest first per
    partition, with when each was replayed.  A dead-letter topic can be long: only what is kept stays
    in memory, and the events' bytes only with ``values`` (a replay needs them, a listing does not)."""
    physical = topic_name(settings, dead_letter(topic))
    async with pool.acquire() as conn:
        replayed = {(r["partition"], r["offset"], r["logged_at"]): r["replayed_at"] for r in await conn.fetch(
            """SELECT partition, "offset", logged_at, replayed_at FROM dead_letter_replay WHERE topic = $1""", physical)}
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False)
    try:
        await consumer.start()
        partitions = consumer.partitions_for_topic(physical)
        if not partitions:
            await consumer._client.force_metadata_update()  # aiokafka: no public refresh
            partitions = consumer.partitions_for_topic(physical)
        if not partitions:
            return []   # nothing was ever dead-lettered there (the topic is made on first use)
        tps = [TopicPartition(physical, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        letters: list[DeadLetter] = []
        remaining = {tp for tp in tps if await consumer.position(tp) < ends[tp]}
        idle = 0
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=1000)
            idle = 0 if batches else idle + 1
            if idle >= _IDLE_POLLS:
                raise TransientError(f"the broker returned nothing of {physical} for {_IDLE_POLLS} s, short of its end",
                                     reason="broker_stalled")
            for tp, records in batches.items():
                for record in records:
                    if record.offset < ends[tp]:
                        letter = _letter(topic, record, replayed, values)
                        if keep is None or keep(letter):
                            letters.append(letter)
                if records and records[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
            for tp in list(remaining):   # also compacted or deleted ranges: the position tells
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return letters


Headers = Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None


def header_pairs(headers: Headers) -> Iterable[tuple[str, bytes]]:
    """A record's headers as (name, value) pairs: aiokafka gives a sequence, faust a mapping."""
    if isinstance(headers, (tuple, list)):   # aiokafka's: checked first, as the Mapping ABC check is slow
        return headers
    return headers.items() if isinstance(headers, Mapping) else headers or ()


def meant_for_another(headers: Headers, group: str) -> bool:
    """Whether an event is a replay for another consumer group, which this group must skip: it
    handled the original already (only the group that refused it had not).  Asked of every record
    a consumer reads, so the common case (no headers) returns at once."""
    if not headers:
        return False
    for name, value in header_pairs(headers):
        if name == REPLAYED_FOR:
            return value.decode(errors="replace") != group
    return False


async def of_message(settings: Settings, pool: asyncpg.Pool, organization_id: UUID, message_id: str) -> list[DeadLetter]:
    """The received messages with this Message-ID that were dead-lettered (an organization's), so
    that "why was this email not tracked?" has an answer when no decision was recorded."""
    wanted = message_id.strip().strip("<>")
    return await read(settings, pool, EMAIL_RECEIVED.name, keep=lambda x: x.organization_id == str(organization_id)
                      and (x.subject or "").strip("<>") == wanted)


async def replay(settings: Settings, pool: asyncpg.Pool, letters: Sequence[DeadLetter]) -> None:
    """Publish each dead letter's event to its original topic (or, for one kept in the outbox, put it
    back in the outbox's queue), then record that it was replayed.  One whose content was left out
    (``content_left_out``) is neither published nor recorded."""
    letters = [x for x in letters if x.content_left_out is None]   # nothing here to publish: see the model
    if not letters:
        return
    publishing = [x for x in letters if not x.kept_in_outbox]
    if publishing:
        publisher = Publisher(settings, client_id="conduit-dead-letters")
        await publisher.start()
        try:
            sent = [await publisher.producer.send(
                topic_name(settings, letter.topic), letter.value, key=letter.raw_key or None,
                headers=[(REPLAYED_FROM, f"{dead_letter(letter.topic)}:{letter.at}".encode())]
                + ([(REPLAYED_FOR, letter.consumer_group.encode())] if letter.consumer_group else []))
                for letter in publishing]
            for acknowledged in sent:
                await acknowledged
        finally:
            await publisher.stop()
    async with pool.acquire() as conn:
        for topic in {x.topic for x in letters if x.kept_in_outbox}:
            await release_set_aside(conn, topic, [x.event_id for x in letters
                                                  if x.kept_in_outbox and x.topic == topic and x.event_id])
        for topic in {x.topic for x in letters}:
            mine = [x for x in letters if x.topic == topic]
            await conn.execute(
                """INSERT INTO dead_letter_replay (topic, partition, "offset", logged_at)
                   SELECT $1, p, o, t FROM unnest($2::int[], $3::bigint[], $4::timestamptz[]) AS u(p, o, t)
                   ON CONFLICT (topic, partition, "offset", logged_at) DO UPDATE SET replayed_at = now()""",
                topic_name(settings, dead_letter(topic)), [x.partition for x in mine], [x.offset for x in mine],
                [x.logged_at for x in mine])


def _letter(topic: str, record: Any, replayed: Mapping[tuple[int, int, datetime], datetime], values: bool) -> DeadLetter:
    headers = {name: value.decode(errors="replace") for name, value in record.headers or ()}
    event = _event_fields(record.value or b"")
    logged_at = datetime.fromtimestamp(record.timestamp / 1000, timezone.utc)
    return DeadLetter(
        topic=topic, partition=record.partition, offset=record.offset, logged_at=logged_at,
        reason=headers.get("reason", "unknown"), error=headers.get("error", ""), consumer_group=headers.get("consumer_group"),
        original_partition=_int(headers.get("original_partition")), original_offset=_int(headers.get("original_offset")),
        key=record.key.decode(errors="replace") if record.key is not None else None,
        replay_of=headers.get(REPLAYED_FROM), replayed_at=replayed.get((record.partition, record.offset, logged_at)),
        kept_in_outbox=headers.get(KEPT_IN_HEADER) == KEPT_IN, content_left_out=_int(headers.get("too_large")),
        value=(record.value or b"") if values else b"", raw_key=record.key, **event,
    )


def _event_fields(value: bytes) -> dict[str, str | None]:
    """What the event says of itself, read leniently: a dead letter may not be JSON at all."""
    try:
        event = json.loads(value)
    except ValueError:
        return {}
    if not isinstance(event, dict):
        return {}
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    subject = data.get("idempotency_key") or data.get("message_id")
    return {"event_type": _text(event.get("type")), "event_id": _text(event.get("event_id")),
            "organization_id": _text(event.get("organization_id")), "subject": _text(subject)}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)[:200]


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.lstrip("-").isdigit() else None
