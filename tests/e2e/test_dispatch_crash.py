"""Never sent twice, never lost: 5,000 requests while the dispatch process is killed with SIGKILL
four times at random points and restarted each time.

The capture SMTP server runs as its own process so it outlives every kill; each message it stores
is counted by its Message-ID, which the send ledger generated once per request.  At the end every
request is `sent` or `failed`; no Message-ID arrived twice; every `sent` one arrived exactly once;
a `failed` one is only ever `outcome_unknown` (a worker died with it in flight: at most one copy
arrived, none was resent), at most the in-flight limit per kill; and the last status on `email.status` agrees with the ledger.
"""
from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import sys
import uuid
from pathlib import Path

import asyncpg

from conduit.peers.smtp import CaptureSmtpServer
from services.dispatch.starts import PLACES_PER_CONNECTION
from shared.kafka import Publisher
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.dispatch import StatusReader, outbound, publish, sending_mailbox
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
TOTAL = 5000
KILLS = 4
WAVE = 64


def _env(settings: Settings, group: str) -> dict[str, str]:
    env = {**os.environ, "CONDUIT_STATE_DIR": str(settings.state_dir), "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
           "CONDUIT_TOPIC_PREFIX": settings.topic_prefix, "PYTHONPATH": str(ROOT), "CONDUIT_HEALTH_PORT": "0",
           "CONDUIT_DISPATCH_GROUP_ID": group, "CONDUIT_DISPATCH_POLL_SECONDS": "0.2",
           "CONDUIT_DISPATCH_RETRY_BASE_SECONDS": "0.2", "CONDUIT_DISPATCH_WAVE_SIZE": str(WAVE),
           "CONDUIT_LOG_LEVEL": "WARNING"}
    env.pop("DATABASE_URL", None)
    return env


async def test_kill_9_four_times_sends_nothing_twice_and_loses_nothing(
        settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool, tmp_path) -> None:
    rng = random.Random()
    with CaptureSmtpServer(tmp_path / "capture", separate_process=True) as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port, max_connections=10)
        events = [outbound(org, mailbox_id=sender.mailbox_id, subject=f"crash {i}", text=f"request {i}\n") for i in range(TOTAL)]
        await publish(publisher, *events)

        async def progress() -> int:
            async with pool.acquire() as conn:
                return await conn.fetchval(
                    "SELECT count(*) FROM outbound_email WHERE organization_id = $1 AND status IN ('sent','failed')", org.id)

        group = f"dispatch-{uuid.uuid4().hex[:8]}"
        cmd = [sys.executable, "-m", "conduit", "run", "dispatch"]
        log = open(tmp_path / "dispatch.log", "ab")
        kills = []
        for kill in range(KILLS):
            proc = await asyncio.create_subprocess_exec(*cmd, env=_env(settings, group), cwd=ROOT, stderr=log)
            start = await progress()
            # A random point in this life: after 100 to 900 more requests are done.
            target = min(TOTAL - 200, start + rng.randint(100, 900))
            await eventually(lambda: _at_least(progress, target), timeout=90, interval=0.01,
                             what=f"progress to {target} before kill {kill + 1}")
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            kills.append(await progress())
        proc = await asyncio.create_subprocess_exec(*cmd, env=_env(settings, group), cwd=ROOT, stderr=log)
        try:
            await eventually(lambda: _at_least(progress, TOTAL), timeout=120, what="every request final")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 60) == 0
            log.close()
        captured = capture.messages()

    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT idempotency_key, status, reason, message_id FROM outbound_email WHERE organization_id = $1", org.id)
    assert len(rows) == TOTAL, "one ledger row per request"
    arrivals = collections.Counter(m.header("Message-ID").strip("<>") for m in captured)
    twice = [mid for mid, n in arrivals.items() if n > 1]
    assert not twice, f"{len(twice)} messages arrived twice"
    sent = [r for r in rows if r["status"] == "sent"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(sent) + len(failed) == TOTAL
    assert all(arrivals[r["message_id"]] == 1 for r in sent), "every sent request arrived exactly once"
    assert {r["reason"] for r in failed} <= {"outcome_unknown"}
    # A worker never holds more than WAVE rows in `sending` (its consumer's claims and its retries share the limit).
    assert len(failed) <= KILLS * WAVE, f"{len(failed)} ambiguous: more than the in-flight limit of {KILLS} kills"
    # Of those, the ones that did not arrive were cleared to start but not yet through: at most the
    # mailbox's places (PLACES_PER_CONNECTION per connection, 10 connections) per kill.  A claimed row
    # that never reached the SMTP pool is sent again by the next worker instead.
    never_arrived = [r for r in failed if not arrivals[r["message_id"]]]
    assert len(never_arrived) <= KILLS * PLACES_PER_CONNECTION * 10, \
        f"{len(never_arrived)} failed as outcome_unknown without having left"
    assert set(arrivals) <= {r["message_id"] for r in rows}
    print(f"\nkills at {kills}; sent {len(sent)}, outcome_unknown {len(failed)} "
          f"(of which arrived: {len(failed) - len(never_arrived)})")

    reader = StatusReader(settings)
    async with reader:
        async def all_final() -> bool:
            await reader.poll()
            return all(reader.final(r["idempotency_key"]) for r in rows)
        await eventually(all_final, timeout=60, what="a final status for every request")
    assert all(reader.final(r["idempotency_key"]).status == r["status"] for r in rows)


async def _at_least(progress, n: int) -> bool:
    return await progress() >= n
