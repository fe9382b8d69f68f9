"""The dispatch consumer: ``shared.consumer.EventConsumer`` with one handler call per fetch.

The shared consumer hands the handler one partition's records at a time.  Against Tansu a fetch
brings a few records per partition, so dispatch would pay its fixed cost per batch (sender look-up,
ledger transaction, claim, outcome transaction: about ten database round trips) for three or four
requests.  This subclass gathers what the fetches returned across partitions (up to ``max_batch``)
into one handler call and commits every partition's offset together, after the handler returned
and the rejections were dead-lettered: the same contract, larger batches.  It also asks the broker
to answer fetches within ``fetch_max_wait_ms`` (latency at low rates).
"""
from __future__ import annotations

import asyncio
import logging
import random
import time

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from shared.consumer import Delivery, EventConsumer, Rejection
from shared.errors import InvalidInput
from shared.events.envelope import decode_event
from shared.kafka import client_options, topic_name

log = logging.getLogger(__name__)


class BatchingConsumer(EventConsumer):
    fetch_max_wait_ms = 20
    batch_window_ms = 15

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            topic_name(self._settings, self._topic.name),
            **client_options(self._settings),
            group_id=self._group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=16 * 1024 * 1024,
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            rebalance_timeout_ms=5_000,
        )
        await self._consumer.start()

    async def run(self, stopping: asyncio.Event, *, burst: bool = False) -> None:
        while not stopping.is_set():
            batches = await self.consumer.getmany(timeout_ms=200, max_records=self._max_batch)
            if not batches:
                if burst and await self._caught_up():
                    return
                continue
            # Top up for a few milliseconds, up to max_batch: a fetch brings one small record
            # batch per partition, and a dispatch batch has a fixed cost worth sharing.
            count = sum(len(r) for r in batches.values())
            window_ends = time.monotonic() + self.batch_window_ms / 1000
            while count < self._max_batch and time.monotonic() < window_ends:
                more = await self.consumer.getmany(timeout_ms=2, max_records=self._max_batch - count)
                if not more:
                    continue
                for tp, records in more.items():
                    batches.setdefault(tp, []).extend(records)
                    count += len(records)
            await self._process_all(batches, stopping)

    async def _process_all(self, batches: dict[TopicPartition, list[ConsumerRecord]], stopping: asyncio.Event) -> None:
        deliveries: list[Delivery] = []
        rejections: list[Rejection] = []
        for records in batches.values():
            for record in records:
                try:
                    deliveries.append(Delivery(decode_event(record.value, self._topic.envelope), record))
                except InvalidInput as exc:
                    rejections.append(Rejection(Delivery(None, record), exc))  # type: ignore[arg-type]
        attempt = 0
        while True:
            try:
                rejections += list(await self._handler(deliveries)) if deliveries else []
                break
            except InvalidInput:
                rejections += await self._handle_one_by_one(deliveries)
                break
            except Exception as exc:  # noqa: BLE001 - transient or unexpected: retry, never skip
                if stopping.is_set():
                    log.warning("stopping with a failed batch left uncommitted: %s", exc)
                    return
                attempt += 1
                delay = min(self._max_backoff, 0.2 * 2**attempt) * random.uniform(0.5, 1.0)
                log.warning("batch failed (attempt %d), retrying in %.1fs: %s", attempt, delay, exc)
                try:
                    await asyncio.wait_for(stopping.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
        for rejection in rejections:
            await self._dead_letter(rejection)
        await self.consumer.commit({tp: records[-1].offset + 1 for tp, records in batches.items()})
        self.processed += sum(len(r) for r in batches.values())
