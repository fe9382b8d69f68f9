"""Transactional outbox: events written with the change they describe, published by a relay.

A registry change (a user added, an activity recorded, a mailbox alert) and the event announcing it
are written in one database transaction, so an event is never published for a change that rolled
back, nor lost for one that committed.  Every service runs a relay; replicas share the rows with
``FOR UPDATE SKIP LOCKED``.  The relay holds its transaction only while the broker acknowledges a
batch (milliseconds), which is what makes two relays never publish the same row concurrently; a
crash after the acknowledgement and before the delete republishes the batch, and consumers
deduplicate on the event id.
"""
from __future__ import annotations

import asyncio
import logging
from json import dumps
from typing import Any

import asyncpg

from shared.events.envelope import Envelope
from shared.kafka import Publisher

log = logging.getLogger(__name__)

CHANNEL = "event_outbox"


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


class OutboxRelay:
    """Publishes outbox rows in id order and deletes them once the broker has them."""

    def __init__(self, pool: asyncpg.Pool, publisher: Publisher, *, batch: int = 500, idle_poll: float = 1.0) -> None:
        self._pool = pool
        self._publisher = publisher
        self._batch = batch
        self._idle_poll = idle_poll
        self._wakeup = asyncio.Event()
        self.published = 0

    async def run(self, stopping: asyncio.Event) -> None:
        listener = await self._pool.acquire()
        await listener.add_listener(CHANNEL, self._on_notify)
        try:
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
            await listener.remove_listener(CHANNEL, self._on_notify)
            await self._pool.release(listener)

    def _on_notify(self, *_: object) -> None:
        self._wakeup.set()

    async def relay_once(self) -> int:
        """Publish one batch; return how many rows went out."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT id, topic, key, payload FROM event_outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                self._batch,
            )
            if not rows:
                return 0
            await self._publisher.publish_many(
                (r["topic"], dumps(r["payload"], separators=(",", ":")).encode(), r["key"]) for r in rows
            )
            await conn.execute("DELETE FROM event_outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows])
        self.published += len(rows)
        return len(rows)
