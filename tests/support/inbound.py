"""What the inbound end-to-end tests share: ingest and evaluate as separate processes (so a test can
kill them with SIGKILL), and the counts that say how far mail has come, read from PostgreSQL."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from uuid import UUID

import aiohttp
import asyncpg

from conduit.peers.ports import free_port
from services.ingest.service import IngestService, IngestSettings
from shared.lifecycle import run_service
from shared.settings import Settings
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def ingest_running(settings: Settings, **options: float) -> AsyncIterator[IngestService]:
    """Ingest as a long-lived service in this process for the block (refreshing its work every 0.5 s
    unless ``options`` say otherwise), then stopped."""
    stopping = asyncio.Event()
    ingest = IngestService(settings, IngestSettings(**{"refresh_seconds": 0.5, "lease_ttl_seconds": 5.0, **options}))
    task = asyncio.create_task(run_service(ingest, stopping=stopping), name="ingest")
    try:
        yield ingest
    finally:
        stopping.set()
        await asyncio.wait_for(task, 60)


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment `conduit run SERVICE` gets: this test's broker, state folder and topic prefix."""
    env = {**os.environ, "CONDUIT_STATE_DIR": str(settings.state_dir),
           "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
           "CONDUIT_TOPIC_PREFIX": settings.topic_prefix, "PYTHONPATH": str(ROOT), "CONDUIT_HEALTH_PORT": "0",
           "CONDUIT_LOG_LEVEL": "WARNING", **extra}
    env.pop("DATABASE_URL", None)
    return env


class ServiceProcess:
    """One `python -m conduit run SERVICE` process at a time, restartable; stderr appended to ``log``.
    Each start gets a health port of its own, so ``ready()`` can ask the process's /readyz."""

    def __init__(self, service: str, env: dict[str, str], log: Path) -> None:
        self.service = service
        self.env = env
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.health_port = 0
        self.starts = 0
        self.kills = 0

    async def start(self) -> None:
        assert self.proc is None or self.proc.returncode is not None, f"{self.service} already runs"
        self.health_port = free_port()
        with open(self.log, "ab") as log:  # noqa: ASYNC230 - a local append, before the child starts
            log.write(f"--- start {self.starts + 1}\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "conduit", "run", self.service, cwd=ROOT,
                env={**self.env, "CONDUIT_HEALTH_PORT": str(self.health_port)},
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        self.starts += 1

    async def ready(self) -> bool:
        """True once the process answers /readyz with 200: started, its signal handlers installed."""
        try:
            async with aiohttp.ClientSession() as http, \
                    http.get(f"http://127.0.0.1:{self.health_port}/readyz", timeout=aiohttp.ClientTimeout(total=5)) as reply:
                return reply.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as when a node dies."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self.kills += 1

    async def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait: the exit status (0 for a clean stop).  A process still starting up (not
        yet ``ready()``) has no handler for SIGTERM yet and dies of it: wait for readiness first."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
            raise AssertionError(f"{self.service} did not stop within {timeout:.0f} s of SIGTERM") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def problems(self) -> list[str]:
        """Lines of the log that report an internal error (ERROR, CRITICAL or a traceback)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]

    def tail(self, n: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-n:])


async def ingested_count(pool: asyncpg.Pool, org_ids: Sequence[UUID]) -> int:
    """Messages ingest has recorded as ingested (stored, published, sync state advanced), per mailbox."""
    async with pool.acquire() as conn:
        return await conn.fetchval(
            """SELECT count(*) FROM ingested_message im JOIN mailbox m ON m.id = im.mailbox_id
               WHERE m.organization_id = ANY($1::uuid[])""", list(org_ids))


async def decided_count(pool: asyncpg.Pool, org_ids: Sequence[UUID]) -> int:
    """Messages evaluate has decided on (one decision per mailbox and Message-ID)."""
    async with pool.acquire() as conn:
        return await conn.fetchval("SELECT count(*) FROM email_decision WHERE organization_id = ANY($1::uuid[])",
                                   list(org_ids))


async def activity_count(pool: asyncpg.Pool, org_ids: Sequence[UUID]) -> int:
    async with pool.acquire() as conn:
        return await conn.fetchval("SELECT count(*) FROM email_activity WHERE organization_id = ANY($1::uuid[])",
                                   list(org_ids))


async def mailbox_ingested(registry, org, email: str, count: int, *, timeout: float = 30) -> None:
    """Wait until ingest has recorded at least ``count`` messages of the mailbox ``email``."""
    async def check() -> bool:
        sync = (await registry.mailbox(org, email, sync=True)).sync
        return sync is not None and sync.ingested >= count
    await eventually(check, timeout=timeout, what=f"{count} message(s) ingested from {email}")
