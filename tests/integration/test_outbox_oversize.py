"""An event larger than the producer or the broker takes, in the outbox: set aside where an operator
sees it (an ERROR, a dead letter standing for it, the row kept), while the events after it go out
in order; replayed once the limit is raised.  Before, the relay retried it for ever, and every event
written after it, of every service, waited behind it.

Tansu takes messages of any size, so the limit here is the producer's (``max_request_size``, made
small); a Kafka broker refuses what exceeds its ``message.max.bytes`` with the same error."""
from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg
import pytest
from aiokafka.errors import MessageSizeTooLargeError
from prometheus_client import REGISTRY

from shared import deadletters
from shared.events.envelope import Envelope
from shared.events.payloads import EmailStatusV1
from shared.kafka import Publisher
from shared.outbox import OutboxRelay, enqueue, enqueue_batch
from shared.settings import Settings
from tests.support.topics import read_topic
from tests.support.waiting import eventually

LIMIT = 128 * 1024          # the producer's max_request_size in these tests
LARGE = 200 * 1024          # the detail of an event too large for it
FILLER = "too-large-detail-"


def status(key: str, value: str, detail_size: int = 0) -> Envelope[EmailStatusV1]:
    detail = (FILLER * (detail_size // len(FILLER) + 1))[:detail_size] if detail_size else None
    return Envelope[EmailStatusV1](type="email.status", schema_version=1, producer="tests", organization_id=uuid.uuid4(),
                                   data=EmailStatusV1(idempotency_key=key, status=value, detail=detail))  # type: ignore[arg-type]


def batch_item(key: str, event: Envelope[EmailStatusV1]) -> tuple[str, str, str]:
    return "email.status", key, event.model_dump_json()


@pytest.fixture
async def small_publisher(settings: Settings):
    p = Publisher(settings, client_id="tests-small", max_request_size=LIMIT)
    await p.start()
    yield p
    await p.stop()


async def statuses(settings: Settings, key: str, expected: int) -> list[str]:
    events = await read_topic(settings, "email.status", expected, timeout=1)
    return [e["data"]["status"] for e in events if e["data"]["idempotency_key"] == key]


async def set_aside_rows(pool: asyncpg.Pool, key: str) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await conn.fetch("SELECT topic, payload->>'event_id' AS event_id, payload::text AS payload "
                                "FROM event_outbox WHERE key = $1 ORDER BY id", key)


async def test_an_event_too_large_is_set_aside_and_the_events_after_it_go_out_in_order(
        settings: Settings, pool: asyncpg.Pool, small_publisher: Publisher, caplog: pytest.LogCaptureFixture) -> None:
    key = f"k-{uuid.uuid4().hex}"
    service = f"svc-{uuid.uuid4().hex[:6]}"
    in_batch = status(key, "sending", LARGE)     # inside a batch row, between two that fit
    alone = status(key, "failed", LARGE)         # a row of its own
    async with pool.acquire() as conn, conn.transaction():
        await enqueue_batch(conn, [batch_item(key, status(key, "pending_send")), batch_item(key, in_batch),
                                   batch_item(key, status(key, "sent"))])
    async with pool.acquire() as conn, conn.transaction():
        await enqueue(conn, "email.status", key, alone)
    async with pool.acquire() as conn, conn.transaction():
        await enqueue_batch(conn, [batch_item(key, status(key, "rejected"))])

    stop = asyncio.Event()
    relay = asyncio.create_task(OutboxRelay(pool, small_publisher, idle_poll=0.1, service=service).run(stop))
    try:
        await eventually(lambda: _equals(statuses(settings, key, 3), ["pending_send", "sent", "rejected"]),
                         what="the events before and after the too large ones published, in order")
    finally:
        stop.set()
        await asyncio.wait_for(relay, 30)

    # Kept in the outbox, whole, under a topic no relay publishes.
    rows = await set_aside_rows(pool, key)
    assert [(r["topic"], r["event_id"]) for r in rows] == [("too_large:email.status", str(in_batch.event_id)),
                                                          ("too_large:email.status", str(alone.event_id))]
    assert [Envelope[EmailStatusV1].model_validate_json(r["payload"]) for r in rows] == [in_batch, alone]
    # A dead letter stands for each, for `conduit dead-letters list` and `replay`.
    letters = await deadletters.read(settings, pool, "email.status", keep=lambda x: x.key == key)
    assert [(x.reason, x.event_id, x.kept_in_outbox) for x in letters] == [
        ("too_large", str(in_batch.event_id), True), ("too_large", str(alone.event_id), True)]
    assert all("kept in the outbox" in x.error and "bytes" in x.error for x in letters)
    assert REGISTRY.get_sample_value("conduit_events_dead_lettered_total",
                                     {"service": service, "topic": "email.status", "reason": "too_large"}) == 2
    # One ERROR each, naming topic, key, event id and size, never the content.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "shared.outbox"]
    assert len(errors) == 2
    for record, event, row in zip(errors, (in_batch, alone), rows):
        line = record.getMessage()
        size = len(row["payload"].encode())   # the bytes the relay publishes: the JSON as PostgreSQL writes it
        assert "email.status" in line and key in line and str(event.event_id) in line and str(size) in line, line
        assert FILLER not in line
        record.expected = True   # this test provokes them


async def test_a_replayed_dead_letter_puts_the_event_back_and_a_larger_limit_publishes_it(
        settings: Settings, pool: asyncpg.Pool, small_publisher: Publisher, publisher: Publisher,
        caplog: pytest.LogCaptureFixture) -> None:
    key = f"k-{uuid.uuid4().hex}"
    large = status(key, "sending", LARGE)
    async with pool.acquire() as conn, conn.transaction():
        await enqueue_batch(conn, [batch_item(key, large), batch_item(key, status(key, "sent"))])
    await relay_all(OutboxRelay(pool, small_publisher))
    await eventually(lambda: _equals(statuses(settings, key, 1), ["sent"]), what="the event after it published")
    for record in caplog.records:
        if record.levelno >= logging.ERROR and record.name == "shared.outbox":
            record.expected = True   # the setting aside, which the first test checks

    # The operator raised the limit (here: a publisher with the default one), and replays.
    letters = await deadletters.read(settings, pool, "email.status", keep=lambda x: x.key == key, values=True)
    assert len(letters) == 1
    await deadletters.replay(settings, pool, letters)
    assert [r["topic"] for r in await set_aside_rows(pool, key)] == ["email.status"]
    await relay_all(OutboxRelay(pool, publisher))

    assert await set_aside_rows(pool, key) == []
    events = [e for e in await read_topic(settings, "email.status", 2) if e["data"]["idempotency_key"] == key]
    assert [e["data"]["status"] for e in events] == ["sent", "sending"]
    assert events[1]["event_id"] == str(large.event_id) and events[1]["data"]["detail"] == large.data.detail
    (again,) = await deadletters.read(settings, pool, "email.status", keep=lambda x: x.key == key)
    assert again.replayed_at is not None


async def test_a_message_larger_than_the_producers_limit_fails_the_batch_before_anything_is_sent(
        settings: Settings, publisher: Publisher) -> None:
    """aiokafka checks ``max_request_size`` only in ``send``; ``publish_many`` builds record batches,
    which take their first record whatever its size.  The limit must hold there too, or the broker
    is the one to refuse it, as Kafka does above its ``message.max.bytes``."""
    key = f"k-{uuid.uuid4().hex}"
    fits = status(key, "sending").model_dump_json().encode()
    too_large = b"x" * (8 * 1024 * 1024 + 1)   # the services' max_request_size (shared/kafka.py), and a byte
    with pytest.raises(MessageSizeTooLargeError, match="max_request_size"):
        await publisher.publish_many([("email.status", fits, key), ("email.status", too_large, key)])
    await publisher.publish_many([("email.status", status(key, "sent").model_dump_json().encode(), key)])
    assert await statuses(settings, key, 1) == ["sent"]


async def relay_all(relay: OutboxRelay) -> None:
    try:
        while await relay.relay_once():
            pass
    finally:
        await relay.close()


async def _equals(found, expected):
    return await found == expected
