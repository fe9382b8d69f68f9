"""What every service is built on: the pool, the publisher, the registry and the outbox relay,
opened in order and closed in reverse, plus the readiness checks the probes report.

A concrete service subclasses ``ServiceBase`` and supplies ``work(stopping, burst)``: its consumers
or pollers.  The outbox relay runs beside them in every service, so registry changes and produced
events go out whichever services are deployed.
"""
from __future__ import annotations

import asyncio
import logging
import asyncpg

from shared.crypto import load_cipher
from shared.db.migrate import check_schema
from shared.db.pool import create_pool
from shared.kafka import Publisher, ensure_topics
from shared.outbox import OutboxRelay
from shared.registry.service import Registry
from shared.settings import Settings

log = logging.getLogger(__name__)


class ServiceBase:
    name = "service"
    pool_size = 10
    # A service that never writes to the outbox may opt out of relaying it (tests use this so a
    # helper service does not publish rows other tests left behind).
    relays_outbox = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool: asyncpg.Pool | None = None
        self.publisher = Publisher(settings, client_id=f"conduit-{self.name}")
        self.registry: Registry | None = None
        self.relay: OutboxRelay | None = None

    async def start(self) -> None:
        self.pool = await create_pool(self.settings, max_size=self.pool_size, name=f"conduit-{self.name}")
        async with self.pool.acquire() as conn:
            unknown = await check_schema(conn)
        if unknown:
            log.warning("the database has migrations this %s does not know (%s): an older version running "
                        "on a newer schema", self.name, ", ".join(unknown))
        await ensure_topics(self.settings)
        await self.publisher.start()
        self.registry = Registry(self.pool, load_cipher(self.settings), producer=self.name)
        self.relay = OutboxRelay(self.pool, self.publisher, service=self.name)
        await self.on_start()

    async def on_start(self) -> None:
        """Open the service's own resources (consumers, clients); called after the shared ones."""

    async def on_stop(self) -> None:
        """Close the service's own resources; called before the shared ones close."""

    async def work(self, stopping: asyncio.Event, *, burst: bool) -> None:
        """The service's main loop; returns when ``stopping`` is set (or, in burst mode, when idle)."""
        await stopping.wait()

    async def run(self, stopping: asyncio.Event, *, burst: bool = False) -> None:
        assert self.relay is not None
        if not self.relays_outbox:
            await self.work(stopping, burst=burst)
            return
        relay_stop = asyncio.Event()
        relay = asyncio.create_task(self.relay.run(relay_stop), name=f"{self.name}-outbox")
        try:
            await self.work(stopping, burst=burst)
        finally:
            # The relay outlives the work so what the last work in flight wrote is published.
            relay_stop.set()
            await relay

    async def stop(self) -> None:
        try:
            await self.on_stop()
        finally:
            await self.publisher.stop()
            if self.pool is not None:
                await self.pool.close()
                self.pool = None

    async def readiness(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            assert self.pool is not None
            async with self.pool.acquire(timeout=2) as conn:
                await conn.fetchval("SELECT 1")
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            checks["database"] = f"unreachable: {type(exc).__name__}"
        try:
            await asyncio.wait_for(self.publisher.producer.client.fetch_all_metadata(), timeout=2)
            checks["kafka"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["kafka"] = f"unreachable: {type(exc).__name__}"
        return checks
