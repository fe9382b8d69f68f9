"""A consumer whose broker comes back without its log, or is away longer than the producer waits
(found by a review of peer outages, helper-76).

Against a Tansu broker of the test's own (memory storage: started again, it has lost every topic's
log, as a broker does whose topic was deleted and made again), with ``EventConsumer`` and a handler
that only notes what it is given:

- a batch handled across the broker's restart (its commit meets a broker that lost the log, which
  answers with a retriable error, retried by aiokafka for ever) does not stop the consumer: events
  published after the restart are all handled, and it stops within 10 s when asked.  (This test
  passed on the code before as well: the reviewer's reproduction, with publishing going on through
  the kill, wedged the old consumer in its commit; the commit is now bounded);
- a batch whose events are dead-lettered while the broker is away longer than the producer's request
  timeout (40 s) waits for it, as a handler's failure is waited out; before, the error ended the consumer.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from conduit.broker import EmbeddedBroker, free_port
from shared.consumer import EventConsumer, Rejection
from shared.errors import InvalidInput
from shared.events.envelope import encode_event
from shared.events.topics import EMAIL_OUTBOUND
from shared.kafka import Publisher, ensure_topics
from shared.settings import Settings
from tests.support.dispatch import outbound
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers

PRODUCER_GIVES_UP = 40.0   # aiokafka's request timeout: what the outage must outlast


def _events(count: int) -> list:
    return [outbound(uuid.uuid4(), sender_email="a@b.example") for _ in range(count)]


async def _publish(publisher: Publisher, events: list) -> list[str]:
    await publisher.publish_many(("email.outbound", encode_event(e), e.data.idempotency_key) for e in events)
    return [e.data.idempotency_key for e in events]


@asynccontextmanager
async def _consuming(settings: Settings, handler) -> AsyncIterator[tuple[EventConsumer, asyncio.Task, asyncio.Event]]:
    publisher = Publisher(settings, client_id="lost-log")
    await publisher.start()
    consumer = EventConsumer(settings, EMAIL_OUTBOUND, group_id=f"g-{uuid.uuid4().hex[:6]}", handler=handler,
                             publisher=publisher)
    await consumer.start()
    stopping = asyncio.Event()
    run = asyncio.create_task(consumer.run(stopping))
    try:
        yield consumer, run, stopping
    finally:
        stopping.set()
        await asyncio.wait([run], timeout=30)
        await asyncio.wait_for(consumer.stop(), 30)
        await publisher.stop()


def _own_broker(base_settings: Settings, state_dir: Path) -> tuple[EmbeddedBroker, Settings]:
    broker = EmbeddedBroker(state_dir / f"tansu-lost-{uuid.uuid4().hex[:6]}.log", port=free_port())
    settings = base_settings.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap_servers,
                                                "topic_prefix": f"lost{uuid.uuid4().hex[:6]}."})
    return broker, settings


async def test_events_after_the_broker_lost_its_log_are_handled_and_the_consumer_stops(
        base_settings: Settings, state_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="aiokafka")   # as `conduit run` has it (conduit/cli/runner.py)
    broker, settings = _own_broker(base_settings, state_dir)
    await broker.start()
    await ensure_topics(settings)
    seen: set[str] = set()
    holding = asyncio.Event()
    may_answer = asyncio.Event()
    held = {e.data.idempotency_key: e for e in _events(1)}

    async def handler(deliveries):
        if any(d.event.data.idempotency_key in held for d in deliveries):
            holding.set()
            await may_answer.wait()   # handled across the restart: its commit meets the new broker
        seen.update(d.event.data.idempotency_key for d in deliveries)
        return []
    try:
        async with _consuming(settings, handler) as (consumer, run, stopping):
            publisher = consumer._publisher
            before = await _publish(publisher, _events(60))
            await eventually(lambda: _all_in(seen, before), timeout=30, what="the first events handled")
            await _publish(publisher, list(held.values()))
            await holding.wait()
            os.kill(broker.pid, signal.SIGKILL)
            await broker.exited()
            await broker.start()   # the same port, no log: every offset starts at 0 again
            await ensure_topics(settings)
            may_answer.set()
            after = await _publish(publisher, _events(20))   # fewer than before: all below the old positions
            await eventually(lambda: _all_in(seen, after), timeout=60, what="the events after the restart handled")
            stopping.set()
            done, _ = await asyncio.wait([run], timeout=10)
            assert done, "the consumer did not stop within 10 s of being asked"
            run.result()
    finally:
        await broker.stop()


async def test_dead_letters_wait_for_a_broker_away_longer_than_the_producer_waits(
        base_settings: Settings, state_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="aiokafka")
    broker, settings = _own_broker(base_settings, state_dir)
    await broker.start()
    await ensure_topics(settings)
    handling = asyncio.Event()
    may_answer = asyncio.Event()

    async def handler(deliveries):
        handling.set()
        await may_answer.wait()   # the broker goes away meanwhile
        return [Rejection(d, InvalidInput("refused for the test", reason="unknown_mailbox")) for d in deliveries]
    try:
        async with _consuming(settings, handler) as (consumer, run, _):
            await _publish(consumer._publisher, _events(3))
            await handling.wait()
            await broker.stop()
            may_answer.set()
            done, _ = await asyncio.wait([run], timeout=PRODUCER_GIVES_UP + 5)
            assert not done, f"the consumer ended while the broker was away: {run.exception()!r}"
            await broker.start()
            await ensure_topics(settings)

            async def dead_lettered() -> bool:
                return consumer.dead_lettered >= 3
            await eventually(dead_lettered, timeout=60, what="the refused events dead-lettered once the broker is back")
    finally:
        await broker.stop()


async def _all_in(seen: set[str], keys: list[str]) -> bool:
    return seen.issuperset(keys)
