"""Transactional outbox: events written with the change they describe, published by a relay.

A registry change (a user added, an activity recorded, a mailbox alert) and the event announcing it
are written in one database transaction, so an event is never published for a change that rolled
back, nor lost for one that committed.  Every service runs a relay, and one of them publishes at a
time (an advisory lock for each batch's transaction), so events leave in the order they were
written.  The relay holds its transaction only while the broker acknowledges a batch
(milliseconds), which is what makes two relays never publish the same row concurrently; a
crash after the acknowledgement and before the delete republishes the batch, and consumers
deduplicate on the event id.

A row is one event, or (``enqueue_batch``) many: a producer that announces hundreds of changes per
transaction writes them as one row whose topic is empty and whose payload is the array of
``{"topic", "key", "event"}``; the relay expands it in the database, in order.  Same guarantee,
one row to insert, lock and delete instead of hundreds.

An event larger than the producer or the broker takes can never be published, and would otherwise
hold back every event after it, of every service, for ever.  The relay sets it aside instead, and
goes on with the next ones in order (the others of a batch row too): the event stays in the outbox,
as a row of its own whose topic is ``too_large:<topic>``, which no relay publishes; a stand-in (the
envelope without its data, and why) goes to ``<topic>.dlq``, so that `conduit dead-letters list`
shows it and `conduit dead-letters replay` puts the event back in the outbox's queue once the limit
is raised; and an ERROR names its topic, key, event id and size.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from json import dumps
from typing import Any

import asyncpg
from aiokafka.errors import KafkaError

from shared.events.envelope import Envelope
from shared.events.topics import dead_letter
from shared.kafka import TOO_LARGE, Publisher
from shared.metrics import EVENTS_DEAD_LETTERED, OUTBOX_PUBLISHED

log = logging.getLogger(__name__)

CHANNEL = "event_outbox"
# The topic of a row that holds a batch of events.
BATCH = ""
# The advisory lock the publishing relay holds for its batch's transaction ("OutBox").
_RELAY_LOCK = 0x4F7574426F78
# What the relay waits out rather than dies of, and the longest wait between its attempts.
_INFRASTRUCTURE_FAILURES = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, KafkaError, TimeoutError)
_MAX_BACKOFF = 30.0
# The topic of an event set aside as too large: ``too_large:<topic>``.  No Kafka topic name has a
# colon, so such a row is never mistaken for one to publish.
SET_ASIDE = "too_large:"
TOO_LARGE_REASON = "too_large"
# The header that marks a dead letter standing for an event kept in the outbox (``shared.deadletters``).
KEPT_IN_HEADER = "kept_in"
KEPT_IN = "event_outbox"


async def enqueue(conn: asyncpg.Connection, topic: str, key: str, event: Envelope[Any]) -> None:
    """Write one event to the outbox inside the caller's transaction."""
    await conn.execute(
        "INSERT INTO event_outbox (topic, key, payload) VALUES ($1, $2, $3)",
        topic, key, event.model_dump(mode="json"),
    )
    await conn.execute("SELECT pg_notify($1, '')", CHANNEL)


async def enqueue_many(conn: asyncpg.Connection, rows: list[tuple[str, str, Envelope[Any]]]) -> None:
    if not rows:
        return
    await conn.executemany(
        "INSERT INTO event_outbox (topic, key, payload) VALUES ($1, $2, $3)",
        [(topic, key, event.model_dump(mode="json")) for topic, key, event in rows],
    )
    await conn.execute("SELECT pg_notify($1, '')", CHANNEL)


async def enqueue_batch(conn: asyncpg.Connection, events: Sequence[tuple[str, str, str]]) -> None:
    """Write (topic, key, envelope JSON) events as one outbox row inside the caller's transaction,
    and wake the relay, in one statement.  The JSON texts must be what ``model_dump_json`` gives."""
    if not events:
        return
    payload = "[" + ",".join(f'{{"topic":{dumps(t)},"key":{dumps(k)},"event":{e}}}' for t, k, e in events) + "]"
    await conn.execute(
        """WITH written AS (INSERT INTO event_outbox (topic, key, payload) VALUES ($1, '', $2::text::jsonb))
           SELECT pg_notify($3, '')""",
        BATCH, payload, CHANNEL,
    )


async def release_set_aside(conn: asyncpg.Connection, topic: str, event_ids: Sequence[str]) -> int:
    """Put events set aside as too large back in the outbox's queue (a dead letter's replay, once the
    limit is raised), and wake the relay; how many there were.  Each goes out in its place by row id;
    one still too large is set aside again, with a new dead letter."""
    status = await conn.execute(
        "UPDATE event_outbox SET topic = $2 WHERE topic = $1 AND payload->>'event_id' = ANY($3::text[])",
        SET_ASIDE + topic, topic, list(event_ids))
    await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
    return int(status.split()[-1])


@dataclass(frozen=True, slots=True)
class _Event:
    row_id: int
    topic: str
    key: str
    value: bytes


class OutboxRelay:
    """Publishes outbox rows in id order and deletes them once the broker has them."""

    def __init__(self, pool: asyncpg.Pool, publisher: Publisher, *, batch: int = 500, idle_poll: float = 1.0,
                 service: str = "conduit") -> None:
        self._pool = pool
        self._publisher = publisher
        self._batch = batch
        self._idle_poll = idle_poll
        self._service = service   # the metrics' label
        self._wakeup = asyncio.Event()
        self._conn: asyncpg.Connection | None = None  # held while running: no pool reset per batch
        self.published = 0

    async def run(self, stopping: asyncio.Event) -> None:
        """Relay until stopped.  A failure of the database or the broker (a restart, a failover, a
        dropped connection) is waited out with capped exponential back-off, never the end of the
        relay: the service it runs in goes on producing events, which would otherwise wait in the
        outbox until the process restarts."""
        failures = 0
        while True:
            try:
                await self._relay_until(stopping)
                return
            except _INFRASTRUCTURE_FAILURES as exc:
                failures += 1
                delay = min(_MAX_BACKOFF, 0.5 * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
                log.warning("the outbox relay failed (attempt %d: %s: %s); starting again in %.1f s",
                            failures, type(exc).__name__, exc, delay)
                if stopping.is_set():
                    return   # what is left stays in the outbox, for whichever relay runs next
                try:
                    await asyncio.wait_for(stopping.wait(), timeout=delay)   # back-off, or the stop
                except TimeoutError:
                    pass

    async def _relay_until(self, stopping: asyncio.Event) -> None:
        listener = await self._pool.acquire()
        try:
            await listener.add_listener(CHANNEL, self._on_notify)
            while not stopping.is_set():
                if await self.relay_once():
                    continue
                self._wakeup.clear()
                waiters = [asyncio.ensure_future(self._wakeup.wait()), asyncio.ensure_future(stopping.wait())]
                await asyncio.wait(waiters, timeout=self._idle_poll, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
            await self.relay_once()  # publish what the last work in flight wrote
        finally:
            # A connection the database dropped raises even when asked whether it is closed: the
            # release and close below must still run (the failure itself is on its way up).
            with contextlib.suppress(*_INFRASTRUCTURE_FAILURES):
                if not listener.is_closed():
                    await listener.remove_listener(CHANNEL, self._on_notify)
            await self._pool.release(listener)   # the pool resets or replaces it
            await self.close()

    async def close(self) -> None:
        """Give back the connection ``relay_once`` keeps between batches."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._pool.release(conn)

    def _on_notify(self, *_: object) -> None:
        self._wakeup.set()

    async def relay_once(self) -> int:
        """Publish one batch; return how many rows went out (or were set aside as too large)."""
        if self._conn is None:
            self._conn = await self._pool.acquire()
        conn = self._conn
        try:
            count, set_aside = await self._relay_batch(conn)
        except BaseException:
            self._conn = None
            await self._pool.release(conn)  # the pool resets or replaces it
            raise
        self.published += count - set_aside
        if count - set_aside:
            OUTBOX_PUBLISHED.labels(self._service).inc(count - set_aside)
        return count

    async def _relay_batch(self, conn: asyncpg.Connection) -> tuple[int, int]:
        """Publish one batch in a transaction: (rows taken from the outbox, events set aside)."""
        async with conn.transaction():
            # The payload as text, straight from the database: no decoding and re-encoding here.
            # One relay publishes at a time (the others wait for the transaction's advisory lock):
            # two relays publishing disjoint batches at once could put a request's `sent` on its
            # partition before its `sending`.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _RELAY_LOCK)
            rows = await conn.fetch(
                """SELECT o.id, coalesce(e.value->>'topic', o.topic) AS topic, coalesce(e.value->>'key', o.key) AS key,
                          coalesce((e.value->'event')::text, o.payload::text) AS payload
                   FROM (SELECT id, topic, key, payload FROM event_outbox WHERE NOT starts_with(topic, $3)
                         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) o
                   LEFT JOIN LATERAL jsonb_array_elements(CASE WHEN o.topic = $2 THEN o.payload END)
                        WITH ORDINALITY AS e(value, n) ON true
                   ORDER BY o.id, e.n""",
                self._batch, BATCH, SET_ASIDE,
            )
            if not rows:
                return 0, 0
            # (A batch row with no events comes back as one row without a topic: deleted, not published.)
            events = [_Event(r["id"], r["topic"], r["key"], r["payload"].encode()) for r in rows if r["topic"]]
            refused = await self._publish(events)
            set_aside = await self._set_aside(conn, refused) if refused else []
            await conn.execute("DELETE FROM event_outbox WHERE id = ANY($1::bigint[])", list({r["id"] for r in rows}))
        for event, event_id, exc in set_aside:   # said once committed: a batch rolled back is relayed again
            EVENTS_DEAD_LETTERED.labels(self._service, event.topic, TOO_LARGE_REASON).inc()
            log.error("an event for %s (key %s, event %s) is %d bytes, more than the producer or the broker "
                      "takes (%s): set aside in the outbox, and on %s for `conduit dead-letters replay` once "
                      "the limit is raised", event.topic, event.key, event_id, len(event.value),
                      type(exc).__name__, dead_letter(event.topic), extra={"event_id": event_id})
        return len(rows), len(set_aside)

    async def _publish(self, events: list[_Event]) -> list[tuple[_Event, KafkaError]]:
        """Publish ``events`` in order; return those the producer or the broker refused as too large,
        with the error.  All at once first; when that is refused, in halves, one after the other,
        down to the single events that cannot go.  A refused part may have been published in part
        (the broker refuses record batches, a partition's each): sent again, consumers deduplicate
        on the event id, as after any retry."""
        refused: list[tuple[_Event, KafkaError]] = []
        parts = [events] if events else []
        while parts:
            part = parts.pop()
            try:
                await self._publisher.publish_many((e.topic, e.value, e.key) for e in part)
            except TOO_LARGE as exc:
                if len(part) == 1:
                    refused.append((part[0], exc))
                    continue
                half = len(part) // 2
                parts += [part[half:], part[:half]]   # a stack: the first half goes next
        return refused

    async def _set_aside(self, conn: asyncpg.Connection,
                         refused: list[tuple[_Event, KafkaError]]) -> list[tuple[_Event, str, KafkaError]]:
        """Keep refused events in the outbox under ``too_large:<topic>``, each with its dead letter;
        return them with their event ids.  Inside the batch's transaction: a failure here rolls it
        all back, to be relayed again."""
        await conn.executemany(
            """INSERT INTO event_outbox (topic, key, payload, created_at)
               SELECT $1, $2, $3::text::jsonb, created_at FROM event_outbox WHERE id = $4""",
            [(SET_ASIDE + event.topic, event.key, event.value.decode(), event.row_id) for event, _ in refused])
        set_aside = []
        for event, exc in refused:
            envelope = _envelope(event.value)
            error = (f"the event is {len(event.value)} bytes, more than the producer or the broker takes ({exc}); "
                     f"it is kept in the outbox (event_outbox, topic {SET_ASIDE}{event.topic}) until replayed")
            await self._publisher.publish_raw(
                dead_letter(event.topic), json.dumps(envelope).encode(), event.key,
                [("reason", TOO_LARGE_REASON.encode()), ("error", error[:1000].encode()),
                 (KEPT_IN_HEADER, KEPT_IN.encode())])
            set_aside.append((event, str(envelope.get("event_id", "?")), exc))
        return set_aside


def _envelope(value: bytes) -> dict[str, Any]:
    """An event's envelope without its data: what a dead letter standing for it carries."""
    try:
        event = json.loads(value)
    except ValueError:
        return {}
    return {k: v for k, v in event.items() if k != "data"} if isinstance(event, dict) else {}
