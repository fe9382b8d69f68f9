"""dispatch: sends the email other systems request on `email.outbound`, exactly once."""
from __future__ import annotations

import asyncio

from shared.runtime import ServiceBase


class DispatchService(ServiceBase):
    name = "dispatch"

    async def work(self, stopping: asyncio.Event, *, burst: bool) -> None:
        if not burst:
            await stopping.wait()
