"""The transactional outbox's relays against PostgreSQL and the broker: every service runs one, and
events still leave in the order they were written."""
from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
from prometheus_client import REGISTRY

from shared.kafka import Publisher
from shared.outbox import OutboxRelay, enqueue_batch
from shared.settings import Settings
from tests.support.topics import read_topic
from tests.support.waiting import eventually


class HeldPublisher:
    """Publishes only when released: a broker acknowledgement that takes its time."""

    def __init__(self, inner: Publisher) -> None:
        self.inner, self.entered, self.release = inner, asyncio.Event(), asyncio.Event()

    async def publish_many(self, items) -> None:
        items = list(items)
        self.entered.set()
        await self.release.wait()
        await self.inner.publish_many(items)


async def test_two_relays_publish_one_requests_statuses_in_order(settings: Settings, pool: asyncpg.Pool,
                                                                 publisher: Publisher) -> None:
    key = f"k-{uuid.uuid4().hex}"

    def status(value: str) -> tuple[str, str, str]:
        return "email.status", key, json.dumps({"event_id": str(uuid.uuid4()), "data": {"idempotency_key": key, "status": value}})

    async def write(value: str) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await enqueue_batch(conn, [status(value)])

    await write("sending")
    held = HeldPublisher(publisher)
    relays = [OutboxRelay(pool, held), OutboxRelay(pool, publisher)]   # two services' relays
    first = asyncio.create_task(relays[0].relay_once())                # the first has `sending`
    second: asyncio.Task[int] | None = None
    try:
        await asyncio.wait_for(held.entered.wait(), 10)
        await write("sent")                                                 # the next turn's transaction
        second = asyncio.create_task(relays[1].relay_once())

        async def second_done_or_waiting() -> bool:
            async with pool.acquire() as conn:
                waiting = await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            return second.done() or waiting > 0
        await eventually(second_done_or_waiting, what="the second relay done or waiting")
    finally:
        held.release.set()
        await asyncio.gather(first, *([second] if second else []))
        for relay in relays:
            await relay.close()
    seen = [e["data"]["status"] for e in await read_topic(settings, "email.status", 2) if e["data"]["idempotency_key"] == key]
    assert seen == ["sending", "sent"]


async def test_what_a_relay_publishes_is_counted_for_its_service(pool: asyncpg.Pool, publisher: Publisher) -> None:
    service = f"svc-{uuid.uuid4().hex[:6]}"
    async with pool.acquire() as conn, conn.transaction():
        await enqueue_batch(conn, [("email.status", "k", json.dumps({"event_id": str(uuid.uuid4()), "data": {}}))] * 3)
    relay = OutboxRelay(pool, publisher, service=service)
    try:
        published = 0
        while (count := await relay.relay_once()):
            published += count
    finally:
        await relay.close()
    assert published >= 3
    assert REGISTRY.get_sample_value("conduit_outbox_published_total", {"service": service}) == published


async def test_a_relay_outlives_a_database_failure(settings: Settings, pool: asyncpg.Pool, publisher: Publisher) -> None:
    """A PostgreSQL restart or failover cuts the relay's connections: it waits the failure out and
    relays again.  Before, its task ended, the service ran on, and every event it wrote afterwards
    (statuses, activities, alerts) stayed in the outbox until the process restarted."""
    from shared.db.pool import database_url

    name = f"relay-{uuid.uuid4().hex[:8]}"
    relay_pool = await asyncpg.create_pool(database_url(settings), min_size=1, max_size=3,
                                           server_settings={"application_name": name})
    key = f"k-{uuid.uuid4().hex}"

    async def write(value: str) -> None:
        event = json.dumps({"event_id": str(uuid.uuid4()), "data": {"idempotency_key": key, "status": value}})
        async with pool.acquire() as conn, conn.transaction():
            await enqueue_batch(conn, [("email.status", key, event)])

    async def published(values: list[str]) -> bool:
        events = await read_topic(settings, "email.status", len(values), timeout=1)
        return [e["data"]["status"] for e in events if e["data"]["idempotency_key"] == key] == values

    stop = asyncio.Event()
    relay = asyncio.create_task(OutboxRelay(relay_pool, publisher, idle_poll=0.2).run(stop))
    try:
        await write("sending")
        await eventually(lambda: published(["sending"]), what="the first event relayed")
        async with pool.acquire() as conn:   # the database drops the relay's connections
            cut = await conn.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                      "WHERE application_name = $1", name)
        assert cut >= 1
        await write("sent")
        await eventually(lambda: published(["sending", "sent"]), timeout=20, what="an event written after the failure relayed")
        assert not relay.done()
    finally:
        stop.set()
        await asyncio.wait_for(relay, 30)
        await relay_pool.close()
