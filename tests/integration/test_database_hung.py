"""A database that stops answering without closing the connection (a hung server, a host gone
behind a firewall that drops rather than refuses): each statement is bounded by
``CONDUIT_DATABASE_COMMAND_TIMEOUT_SECONDS``, so a service fails the statement, takes another
connection and goes on, instead of waiting on the dead one for ever.

The hang is real: the PostgreSQL backends serving the service's pool (told by the
``application_name`` each pool gives its sessions) are stopped with SIGSTOP, and continued at the
end.  Against PostgreSQL, the broker and a scripted SMTP server.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.db.pool import create_pool
from shared.kafka import Publisher
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.dispatch import dispatch_running, finals, outbound, publish, sending_mailbox
from tests.support.scripted_smtp import ScriptedSmtpServer, well_behaved
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers

BOUND = 2.0


@contextlib.asynccontextmanager
async def backends_stopped(pool: asyncpg.Pool, application_name: str) -> AsyncIterator[list[int]]:
    """SIGSTOP every backend now serving ``application_name``; SIGCONT them when the block ends."""
    async with pool.acquire() as conn:
        pids = [r["pid"] for r in await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()", application_name)]
    assert pids, f"no backend serves {application_name}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def test_a_statement_to_a_hung_backend_fails_within_the_bound(settings: Settings, pool: asyncpg.Pool) -> None:
    bounded = settings.model_copy(update={"database_command_timeout_seconds": BOUND})
    hung = await create_pool(bounded, max_size=2, name="conduit-hung-test")
    try:
        async with hung.acquire() as conn:
            await conn.fetchval("SELECT 1")
            async with backends_stopped(pool, "conduit-hung-test"):
                start = time.monotonic()
                with pytest.raises(TimeoutError):
                    await conn.fetchval("SELECT 1")
                assert time.monotonic() - start < BOUND + 3
        async with hung.acquire() as conn:   # the pool goes on with a live session
            assert await conn.fetchval("SELECT 2") == 2
    finally:
        await hung.close()


async def test_dispatch_goes_on_sending_while_its_database_sessions_hang(
        settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool) -> None:
    bounded = settings.model_copy(update={"database_command_timeout_seconds": BOUND})
    async with ScriptedSmtpServer(well_behaved()) as server:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=server.port)
        before = [outbound(org, mailbox_id=sender.mailbox_id, subject=f"before {i}") for i in range(3)]
        after = [outbound(org, mailbox_id=sender.mailbox_id, subject=f"after {i}") for i in range(3)]
        async with dispatch_running(bounded, retry_base_seconds=0.05):
            await publish(publisher, *before)
            await finals(settings, [e.data.idempotency_key for e in before], timeout=30)
            async with backends_stopped(pool, "conduit-dispatch"):
                await publish(publisher, *after)
                # Sent while every session dispatch held is still stopped: it took new ones.
                reader = await finals(settings, [e.data.idempotency_key for e in after], timeout=60)
                async def all_sent() -> bool:
                    return len(server.contents) >= 6
                await eventually(all_sent, timeout=30, what="every message at the server")
    assert [reader.final(e.data.idempotency_key).status for e in after] == ["sent"] * 3
    assert len(server.contents) == 6 and len(set(server.contents)) == 6   # each once
