"""EventConsumer when things go wrong around a batch, against the real broker.

- A group that rebalances while a replica handles a batch (another replica joins: a scale-up, a
  deploy): the replica that lost partitions mid-batch carries on, and their new owner handles those
  events again.  aiokafka refuses the old owner's commit (IllegalStateError, CommitFailedError),
  which used to end the service.
- A transient failure while a batch is handled one event at a time (after the handler could not say
  which event was invalid) is retried like any other, instead of ending the service.
- An event that makes the handler fail with an unexpected exception (a bug its input meets) is set
  aside as ``internal_error`` after a few attempts; it used to hold its partitions, and every event
  batched with it, for ever."""
from __future__ import annotations

import asyncio
import uuid
from typing import Sequence

from aiokafka import AIOKafkaConsumer
from prometheus_client import REGISTRY

from shared import deadletters
from shared.consumer import Delivery, EventConsumer, Rejection
from shared.errors import InvalidInput, TransientError
from shared.events.envelope import Envelope, encode_event
from shared.events.payloads import MailboxEventV1
from shared.events.topics import MAILBOX_EVENTS, dead_letter
from shared.kafka import Publisher, client_options, topic_name
from tests.support.waiting import eventually

EVENTS = 40


async def test_a_replica_that_loses_partitions_mid_batch_carries_on(settings, publisher) -> None:
    sent = set()
    for n in range(EVENTS):
        event = Envelope[MailboxEventV1](type=MAILBOX_EVENTS.name, schema_version=1, producer="tests",
                                         organization_id=uuid.uuid4(),
                                         data=MailboxEventV1(mailbox_id=uuid.uuid4(), kind="tested"))
        await publisher.publish(MAILBOX_EVENTS.name, event, key=str(n))
        sent.add(event.event_id)
    group = f"rebalance-{uuid.uuid4().hex[:8]}"
    inside, release = asyncio.Event(), asyncio.Event()
    handled: list[uuid.UUID] = []

    async def first_handler(deliveries: Sequence[Delivery]) -> Sequence[Rejection]:
        inside.set()
        await release.wait()     # a long batch, until the group has rebalanced
        handled.extend(d.event.event_id for d in deliveries)
        return []

    async def second_handler(deliveries: Sequence[Delivery]) -> Sequence[Rejection]:
        handled.extend(d.event.event_id for d in deliveries)
        return []

    first = EventConsumer(settings, MAILBOX_EVENTS, group_id=group, handler=first_handler, publisher=publisher,
                          across_partitions=True)
    second = EventConsumer(settings, MAILBOX_EVENTS, group_id=group, handler=second_handler, publisher=publisher,
                           across_partitions=True)
    await first.start()
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    run_first = asyncio.create_task(first.run(stop_first))
    run_second = None
    try:
        await asyncio.wait_for(inside.wait(), 30)
        await second.start()
        run_second = asyncio.create_task(second.run(stop_second))

        async def rebalanced() -> bool:
            return bool(second.consumer.assignment()) or run_second.done()
        await eventually(rebalanced, timeout=60, what="the second replica to be given partitions")
        release.set()

        async def batch_done() -> bool:
            return first.processed > 0 or run_first.done()
        await eventually(batch_done, timeout=30, what="the first replica to finish its batch")
        assert not run_first.done(), run_first.exception()

        async def all_handled() -> bool:
            return sent <= set(handled) or run_first.done() or run_second.done()
        await eventually(all_handled, timeout=30, what="every event handled")
        assert not run_first.done() and not run_second.done()
        assert sent <= set(handled)
    finally:
        release.set()
        stop_first.set()
        stop_second.set()
        await asyncio.gather(run_first, *([run_second] if run_second else []), return_exceptions=True)
        await first.stop()
        await second.stop()


async def test_a_transient_failure_while_handling_one_by_one_is_retried(settings, publisher) -> None:
    events = []
    for n in range(3):
        event = Envelope[MailboxEventV1](type=MAILBOX_EVENTS.name, schema_version=1, producer="tests",
                                         organization_id=uuid.uuid4(),
                                         data=MailboxEventV1(mailbox_id=uuid.uuid4(), kind="tested"))
        await publisher.publish(MAILBOX_EVENTS.name, event, key="one-partition")
        events.append(event.event_id)
    bad = events[1]
    failures = {"transient": 1}
    handled: list[uuid.UUID] = []

    async def handler(deliveries: Sequence[Delivery]) -> Sequence[Rejection]:
        ids = [d.event.event_id for d in deliveries]
        if len(ids) > 1 and bad in ids:
            raise InvalidInput("one of these is wrong")       # which one, the handler cannot say
        if ids == [bad]:
            raise InvalidInput("this one is wrong")
        if failures["transient"]:
            failures["transient"] -= 1
            raise TransientError("the database restarted")     # during the one-by-one pass
        handled.extend(ids)
        return []

    consumer = EventConsumer(settings, MAILBOX_EVENTS, group_id=f"one-by-one-{uuid.uuid4().hex[:8]}", handler=handler,
                             publisher=publisher, across_partitions=True, max_backoff=0.2, service="one-by-one")
    await consumer.start()
    stopping = asyncio.Event()
    running = asyncio.create_task(consumer.run(stopping))
    try:
        async def done() -> bool:
            return consumer.processed == 3 or running.done()
        await eventually(done, timeout=30, what="the batch handled and committed")
        assert not running.done(), running.exception()
        assert sorted(handled) == sorted(e for e in events if e != bad) and failures["transient"] == 0
        assert REGISTRY.get_sample_value("conduit_events_consumed_total",
                                         {"service": "one-by-one", "topic": MAILBOX_EVENTS.name}) == 3
    finally:
        stopping.set()
        await asyncio.gather(running, return_exceptions=True)
        await consumer.stop()


async def test_an_event_a_bug_meets_is_dead_lettered_and_the_others_go_on(settings, publisher, caplog) -> None:
    events = []
    for n in range(4):
        event = Envelope[MailboxEventV1](type=MAILBOX_EVENTS.name, schema_version=1, producer="tests",
                                         organization_id=uuid.uuid4(),
                                         data=MailboxEventV1(mailbox_id=uuid.uuid4(), kind="tested"))
        await publisher.publish(MAILBOX_EVENTS.name, event, key="one-partition")
        events.append(event.event_id)
    poison = events[2]
    handled: list[uuid.UUID] = []
    failures = {"transient": 1}

    async def handler(deliveries: Sequence[Delivery]) -> Sequence[Rejection]:
        ids = [d.event.event_id for d in deliveries]
        if poison in ids:
            raise RecursionError("maximum recursion depth exceeded")   # as email.utils on nested comments
        if failures["transient"] and len(ids) == 1:
            failures["transient"] -= 1
            raise TransientError("the database restarted")     # during the one-by-one pass: retried
        handled.extend(ids)
        return []

    service = f"bug-{uuid.uuid4().hex[:6]}"
    consumer = EventConsumer(settings, MAILBOX_EVENTS, group_id=f"bug-{uuid.uuid4().hex[:8]}", handler=handler,
                             publisher=publisher, across_partitions=True, max_backoff=0.2, service=service)
    await consumer.start()
    stopping = asyncio.Event()
    running = asyncio.create_task(consumer.run(stopping))
    try:
        async def done() -> bool:
            return consumer.processed == 4 or running.done()
        await eventually(done, timeout=30, what="the batch handled and committed")
        assert not running.done(), running.exception()
        assert sorted(handled) == sorted(e for e in events if e != poison) and failures["transient"] == 0
        assert consumer.dead_lettered == 1
        assert REGISTRY.get_sample_value("conduit_events_dead_lettered_total", {
            "service": service, "topic": MAILBOX_EVENTS.name, "reason": "internal_error"}) == 1
        # Said as errors, with the event's place (these are expected here).
        logged = [r for r in caplog.get_records("call") if r.levelname == "ERROR" and "RecursionError" in r.getMessage()]
        assert any("dead-lettered as internal_error" in r.getMessage() for r in logged)
        for record in logged:
            record.expected = True
    finally:
        stopping.set()
        await asyncio.gather(running, return_exceptions=True)
        await consumer.stop()


async def test_an_event_too_large_for_the_dead_letter_topic_is_dead_lettered_without_its_content(
        settings, publisher, pool, caplog) -> None:
    large = Envelope[MailboxEventV1](type=MAILBOX_EVENTS.name, schema_version=1, producer="tests",
                                     organization_id=uuid.uuid4(),
                                     data=MailboxEventV1(mailbox_id=uuid.uuid4(), kind="tested", message="x" * 200_000))
    await publisher.publish(MAILBOX_EVENTS.name, large, key="one-partition")

    async def refuse(deliveries: Sequence[Delivery]) -> Sequence[Rejection]:
        return [Rejection(d, InvalidInput("refused by a rule", reason="refused")) for d in deliveries]

    # The consumer's own publisher takes less than the topic held (as a dead-letter topic may).
    small = Publisher(settings, client_id="small", max_request_size=64 * 1024)
    await small.start()
    consumer = EventConsumer(settings, MAILBOX_EVENTS, group_id=f"large-{uuid.uuid4().hex[:8]}", handler=refuse,
                             publisher=small, across_partitions=True, max_backoff=0.2)
    await consumer.start()
    stopping = asyncio.Event()
    running = asyncio.create_task(consumer.run(stopping))
    try:
        async def done() -> bool:
            return consumer.processed == 1 or running.done()
        await eventually(done, timeout=30, what="the batch dead-lettered and committed")
        for record in caplog.get_records("call"):   # said as an error (expected here)
            if "too large for the dead-letter topic" in record.getMessage():
                record.expected = True
        assert not running.done(), running.exception()   # it used to end the consumer at every start
        letters = await dead_letters(settings, MAILBOX_EVENTS.name)
        assert [(r.value, dict(r.headers)["reason"], int(dict(r.headers)["too_large"])) for r in letters] == \
            [(b"", b"refused", len(encode_event(large)))]
        # Listed as such, and a replay publishes no empty event in its place.
        (letter,) = await deadletters.read(settings, pool, MAILBOX_EVENTS.name)
        assert letter.content_left_out == len(encode_event(large))
        await deadletters.replay(settings, pool, [letter])
        assert (await deadletters.read(settings, pool, MAILBOX_EVENTS.name))[0].replayed_at is None
    finally:
        stopping.set()
        await asyncio.gather(running, return_exceptions=True)
        await consumer.stop()
        await small.stop()


async def dead_letters(settings, topic: str, expected: int = 1, timeout: float = 15.0) -> list:
    """The records on the topic's dead-letter topic, once there are ``expected`` (or at the deadline)."""
    reader = AIOKafkaConsumer(topic_name(settings, dead_letter(topic)), **client_options(settings), group_id=None,
                              auto_offset_reset="earliest", enable_auto_commit=False)
    await reader.start()
    records: list = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(records) < expected and asyncio.get_running_loop().time() < deadline:
            batches = await reader.getmany(timeout_ms=300)
            records += [r for batch in batches.values() for r in batch]
        return records
    finally:
        await reader.stop()
