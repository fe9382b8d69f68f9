"""A minimal real service for lifecycle tests: consumes `mailbox.events` and records each event id
in a table, idempotently, through the shared consumer.  Run as a separate process so a test can
send it SIGTERM or SIGKILL."""
from __future__ import annotations

import argparse
import asyncio
from typing import Sequence

from shared.consumer import Delivery, EventConsumer, Rejection
from shared.events.topics import MAILBOX_EVENTS
from shared.lifecycle import run_service
from shared.logs import configure_logging
from shared.runtime import ServiceBase
from shared.settings import Settings


class EffectService(ServiceBase):
    name = "effect"
    relays_outbox = False  # it writes no outbox rows; relaying would publish other tests' leftovers

    def __init__(self, settings: Settings, table: str, group: str) -> None:
        super().__init__(settings)
        self.table = table
        self.group = group
        self.consumer: EventConsumer | None = None

    async def on_start(self) -> None:
        self.consumer = EventConsumer(self.settings, MAILBOX_EVENTS, group_id=self.group, handler=self.handle,
                                      publisher=self.publisher, max_batch=50)
        await self.consumer.start()

    async def on_stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()

    async def handle(self, deliveries: Sequence[Delivery]) -> Sequence[Rejection]:
        assert self.pool is not None
        async with self.pool.acquire() as conn, conn.transaction():
            for d in deliveries:  # one round trip each: slow enough for a signal to land mid-batch
                await conn.execute(f"INSERT INTO {self.table} (event_id) VALUES ($1) ON CONFLICT DO NOTHING", d.event.event_id)
        return []

    async def work(self, stopping: asyncio.Event, *, burst: bool) -> None:
        assert self.consumer is not None
        await self.consumer.run(stopping, burst=burst)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--table", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--burst", action="store_true")
    args = parser.parse_args()
    settings = Settings()
    configure_logging(settings, "effect")
    asyncio.run(run_service(EffectService(settings, args.table, args.group), health_port=None, burst=args.burst))


if __name__ == "__main__":
    main()
