"""EventConsumer with ``stages``: the next batch is prepared while the previous one finishes, batches
still finish one at a time in order, a failed batch is retried whole, and every offset is committed.
Against the real broker."""
from __future__ import annotations

import asyncio
import uuid
from typing import Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.consumer import Delivery, EventConsumer, Rejection
from shared.errors import TransientError
from shared.events.envelope import Envelope
from shared.events.payloads import MailboxEventV1
from shared.events.topics import MAILBOX_EVENTS
from shared.kafka import client_options, topic_name

EVENTS = 60


class Stages:
    """Records what each step saw; a finish after the third prepare fails once."""

    def __init__(self) -> None:
        self.prepared_batches = 0
        self.progress = asyncio.Event()
        self.finishing = False
        self.overlapped = 0        # finishes during which the next batch's prepare began
        self.finished: list[uuid.UUID] = []
        self.failed_once = False

    async def prepare(self, deliveries: Sequence[Delivery]) -> tuple[int, list[Delivery]]:
        self.prepared_batches += 1
        self.progress.set()
        return self.prepared_batches, list(deliveries)

    async def finish(self, prepared: tuple[int | None, list[Delivery]]) -> Sequence[Rejection]:
        number, deliveries = prepared
        assert not self.finishing, "two batches finishing at once"
        self.finishing = True
        try:
            if number is not None and len(self.finished) + len(deliveries) < EVENTS:
                # Held until the next batch's prepare begins: only an overlapped consumer gets there.
                while self.prepared_batches <= number:
                    self.progress.clear()
                    await asyncio.wait_for(self.progress.wait(), timeout=10)
                self.overlapped += 1
            if self.prepared_batches >= 3 and not self.failed_once:
                self.failed_once = True
                raise TransientError("the database went away for a moment")
            self.finished.extend(d.event.event_id for d in deliveries)
            return []
        finally:
            self.finishing = False

    async def handle(self, deliveries: Sequence[Delivery]) -> Sequence[Rejection]:
        """The whole handler, as a retry runs it: nothing is prepared meanwhile, so nothing is held."""
        return await self.finish((None, list(deliveries)))


async def test_stages_overlap_yet_finish_in_order_once_each(settings, publisher):
    sent = []
    for n in range(EVENTS):
        event = Envelope[MailboxEventV1](type=MAILBOX_EVENTS.name, schema_version=1, producer="tests",
                                         organization_id=uuid.uuid4(),
                                         data=MailboxEventV1(mailbox_id=uuid.uuid4(), kind="tested"))
        sent.append(event.event_id)
        await publisher.publish(MAILBOX_EVENTS.name, event, key=str(n))
    stages = Stages()
    group = f"stages-{uuid.uuid4().hex[:8]}"
    consumer = EventConsumer(settings, MAILBOX_EVENTS, group_id=group, handler=stages.handle, publisher=publisher,
                             max_batch=10, max_backoff=0.2, across_partitions=True,
                             stages=(stages.prepare, stages.finish))
    await consumer.start()
    try:
        await asyncio.wait_for(consumer.run(asyncio.Event(), burst=True), timeout=60)
        assignment = list(consumer.consumer.assignment())
        committed = {tp: await consumer.consumer.committed(tp) for tp in assignment}
    finally:
        await consumer.stop()

    assert stages.failed_once
    assert sorted(stages.finished) == sorted(sent)  # each once, the failed batch too
    assert stages.overlapped >= 2
    reader = AIOKafkaConsumer(**client_options(settings))
    await reader.start()
    try:
        parts = reader.partitions_for_topic(topic_name(settings, MAILBOX_EVENTS.name)) or set()
        ends = await reader.end_offsets([TopicPartition(topic_name(settings, MAILBOX_EVENTS.name), p) for p in parts])
    finally:
        await reader.stop()
    # Tansu's ListOffsets can under-report a partition's end (see docs/benchmarks.md), never over.
    for tp, end in ends.items():
        assert (committed.get(tp) or 0) >= end, (tp, committed.get(tp), end)
