"""exchange_sync: appointments, contacts and tasks with Exchange, and folder-level tracking.

Today it runs the shared lifecycle (outbox relay, health, metrics) and watches which mailboxes have
appointments/contacts/tasks enabled; the synchronization itself is the Exchange issue's work.
"""
from __future__ import annotations

import asyncio
import logging

from shared.runtime import ServiceBase

log = logging.getLogger(__name__)


class ExchangeSyncService(ServiceBase):
    name = "exchange_sync"
    pool_size = 4

    async def work(self, stopping: asyncio.Event, *, burst: bool) -> None:
        assert self.registry is not None
        mailboxes = await self.registry.mailboxes_to_process("act")
        log.info("%d mailboxes have appointments, contacts and tasks enabled", len(mailboxes))
        if not burst:
            await stopping.wait()
