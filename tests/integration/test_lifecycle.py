"""A service stops cleanly on SIGTERM: work in flight finishes, its offsets are committed, nothing
is lost or done twice across the restart."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.events.envelope import Envelope, encode_event
from shared.events.payloads import MailboxEventV1
from shared.kafka import Publisher, client_options, topic_name
from shared.settings import Settings
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]


def _env(settings: Settings) -> dict[str, str]:
    return {**os.environ, "CONDUIT_STATE_DIR": str(settings.state_dir),
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
            "CONDUIT_TOPIC_PREFIX": settings.topic_prefix, "PYTHONPATH": str(ROOT)}


async def _committed(settings: Settings, group: str) -> int:
    consumer = AIOKafkaConsumer(**client_options(settings), group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        name = topic_name(settings, "mailbox.events")
        partitions = consumer.partitions_for_topic(name) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(name) or set()
        total = 0
        for p in partitions:
            total += await consumer.committed(TopicPartition(name, p)) or 0
        return total
    finally:
        await consumer.stop()


async def test_sigterm_finishes_work_commits_and_loses_nothing(settings: Settings, publisher: Publisher, pool: asyncpg.Pool) -> None:
    table = f"effect_{uuid.uuid4().hex[:10]}"
    group = f"g-{uuid.uuid4().hex[:8]}"
    async with pool.acquire() as conn:
        await conn.execute(f"CREATE TABLE {table} (event_id uuid PRIMARY KEY)")
    total = 20_000   # ~2-3 s of work: 2,000 were all done before the SIGTERM landed, in a CI check
    org = uuid.uuid4()
    await publisher.publish_many(
        ("mailbox.events", encode_event(Envelope[MailboxEventV1](
            type="mailbox.events", schema_version=1, producer="tests", organization_id=org,
            data=MailboxEventV1(mailbox_id=uuid.uuid4(), kind="updated"))), str(i))
        for i in range(total)
    )

    async def count() -> int:
        async with pool.acquire() as conn:
            return await conn.fetchval(f"SELECT count(*) FROM {table}")

    cmd = [sys.executable, "-m", "tests.support.effect_service", "--table", table, "--group", group]
    proc = await asyncio.create_subprocess_exec(*cmd, env=_env(settings), cwd=ROOT)
    await eventually(lambda: _gt(count, 200), timeout=60, what="the service to process some events")
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    done = await count()
    assert 0 < done < total, "SIGTERM should land mid-stream"
    assert await _committed(settings, group) == done, "offsets committed must equal the effects made"

    rerun = await asyncio.create_subprocess_exec(*cmd, "--burst", env=_env(settings), cwd=ROOT)
    assert await asyncio.wait_for(rerun.wait(), 120) == 0
    assert await count() == total
    assert await _committed(settings, group) == total


async def _gt(count, n: int) -> bool:
    return await count() > n
