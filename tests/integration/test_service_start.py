"""How a service starts and stops, as Kubernetes sees it (an operator audit's findings):
- on a database that lacks migrations it refuses to start, naming them, instead of starting, saying
  ready, and failing query by query;
- while it drains after SIGTERM, /readyz says it is stopping (no new work is routed to it)."""
from __future__ import annotations

import asyncio
import os
import sys

import aiohttp
import asyncpg
import pytest
from pydantic import SecretStr

from conduit.peers.ports import free_port
from services.ingest.service import IngestService
from shared.db.migrate import SchemaMismatch
from shared.db.pool import database_url
from shared.lifecycle import run_service
from shared.settings import Settings
from tests.support.cli import ROOT
from tests.support.databases import scratch_database
from tests.support.waiting import eventually


async def test_a_service_refuses_a_database_that_lacks_migrations(settings: Settings) -> None:
    async with scratch_database(database_url(settings), "old") as url:
        with pytest.raises(SchemaMismatch) as refused:
            await run_service(IngestService(settings.model_copy(update={"database_url": SecretStr(url)})), burst=True)
    assert "the database needs migrations 0001_registry" in str(refused.value)
    assert "run `conduit db migrate` first" in str(refused.value)


class Draining:
    """A service whose stop takes as long as the test says (sends in flight finishing)."""

    name = "draining"

    def __init__(self) -> None:
        self.drained = asyncio.Event()

    async def start(self) -> None: ...

    async def run(self, stopping: asyncio.Event, *, burst: bool = False) -> None:
        await stopping.wait()
        await self.drained.wait()

    async def stop(self) -> None: ...

    async def readiness(self) -> dict[str, str]:
        return {"database": "ok", "kafka": "ok"}


async def test_readyz_says_stopping_while_the_service_drains() -> None:
    port = free_port()
    service, stopping = Draining(), asyncio.Event()
    running = asyncio.create_task(run_service(service, health_port=port, stopping=stopping))
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        async with aiohttp.ClientSession() as http:
            async def status() -> int:
                async with http.get(url) as reply:
                    return reply.status
            async def ready() -> bool:
                try:
                    return await status() == 200
                except aiohttp.ClientConnectionError:
                    return False
            await eventually(ready, timeout=10, what="/readyz to answer 200")
            stopping.set()                       # SIGTERM: the service drains
            async with http.get(url) as reply:
                assert reply.status == 503 and (await reply.json())["status"] == "stopping"
    finally:
        stopping.set()
        service.drained.set()
        await asyncio.wait_for(running, 10)


async def test_a_migration_changed_after_it_was_applied_is_named(settings: Settings) -> None:
    """`conduit db migrate` (the Kubernetes Job) said only "unexpected RuntimeError (a bug ...)"."""
    async with scratch_database(database_url(settings), "changed") as url:
        async def migrate() -> tuple[int, str]:
            env = {**os.environ, "DATABASE_URL": url, "CONDUIT_STATE_DIR": str(settings.state_dir), "PYTHONPATH": str(ROOT)}
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "conduit", "db", "migrate", env=env, cwd=ROOT,
                                                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(proc.communicate(), 120)
            return proc.returncode, err.decode()

        assert (await migrate())[0] == 0
        changed = await asyncpg.connect(url)
        try:
            await changed.execute("UPDATE schema_migration SET checksum = 'x' WHERE version = '0003_outbound'")
        finally:
            await changed.close()
        code, err = await migrate()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "migration 0003_outbound was changed after it was applied" in err, err


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
async def test_the_probes_listen_where_they_are_told(host: str) -> None:
    """`conduit up` gives its services the loopback address (a laptop's probes are not the
    network's); a pod listens on every interface, where the kubelet and Prometheus reach it."""
    import psutil

    port = free_port()
    service, stopping = Draining(), asyncio.Event()
    service.drained.set()
    running = asyncio.create_task(run_service(service, health_port=port, stopping=stopping, health_host=host))
    try:
        async def listening() -> list[str]:
            return [c.laddr.ip for c in psutil.net_connections(kind="tcp")
                    if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert await eventually(listening, timeout=10, what="the health server to listen") == [host]
    finally:
        stopping.set()
        await asyncio.wait_for(running, 10)
