"""evaluate: decides which received email matters, correlates it and records email activities."""
from __future__ import annotations

import asyncio

from shared.runtime import ServiceBase


class EvaluateService(ServiceBase):
    name = "evaluate"

    async def work(self, stopping: asyncio.Event, *, burst: bool) -> None:
        if not burst:
            await stopping.wait()
