"""Evaluate stops when told to, even while its health aggregate is still starting against a broker
that does not answer (a stack stopped as it starts, or whose embedded broker died with it)."""
from __future__ import annotations

import asyncio
import time

from services.evaluate.health import start_health
from services.evaluate.service import unless_stopping
from shared.settings import Settings


async def test_a_stop_during_the_health_aggregates_start_is_not_kept_waiting(base_settings: Settings) -> None:
    connected = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def stalled_broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Accepts the connection and never answers a request: the start waits on it.
        held.append(writer)
        connected.set()

    server = await asyncio.start_server(stalled_broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = base_settings.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{port}"})
    stopping = asyncio.Event()
    try:
        starting = asyncio.ensure_future(unless_stopping(start_health(settings), stopping, unwind_seconds=2))
        await asyncio.wait_for(connected.wait(), 20)
        stopping.set()   # SIGTERM, as the service's signal handler sets it
        began = time.monotonic()
        assert await asyncio.wait_for(starting, 10) is None
        assert time.monotonic() - began < 5
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_an_aggregate_start_cancelled_from_outside_is_cancelled_too() -> None:
    """The consumer failed while the aggregate was starting: work() cancels the aggregate's task,
    and the start inside must end with it, not finish alone and leave a running app nobody stops."""
    began, ended = asyncio.Event(), asyncio.Event()

    async def start() -> str:
        began.set()
        try:
            await asyncio.Event().wait()   # a start that waits on the broker
        finally:
            ended.set()
        return "handle"

    waiting = asyncio.ensure_future(unless_stopping(start(), asyncio.Event(), unwind_seconds=2))
    await asyncio.wait_for(began.wait(), 5)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert ended.is_set()
