"""ingest: pulls email from IMAP, POP3 and Exchange mailboxes into raw storage and `email.received`."""
from __future__ import annotations

import asyncio

from shared.runtime import ServiceBase


class IngestService(ServiceBase):
    name = "ingest"

    async def work(self, stopping: asyncio.Event, *, burst: bool) -> None:
        if not burst:
            await stopping.wait()
