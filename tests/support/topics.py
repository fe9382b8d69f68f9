"""Reading what a test's services published: every event of one of the test's topics."""
from __future__ import annotations

import asyncio
import json

from aiokafka import AIOKafkaConsumer

from shared.kafka import client_options, topic_name
from shared.settings import Settings


async def read_topic(settings: Settings, name: str, expected: int, timeout: float = 15.0) -> list[dict]:
    """All events on the test's ``name`` topic, from the start, waiting until there are ``expected``
    (then until a fetch brings nothing more, so an extra event is seen too)."""
    consumer = AIOKafkaConsumer(topic_name(settings, name), **client_options(settings),
                                group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    events: list[dict] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                events += [json.loads(r.value) for r in records]
            if len(events) >= expected and not batch:
                break
    finally:
        await consumer.stop()
    return events
