"""A graceful stop (SIGTERM) while the consumer's accept transaction claims a request: the send loop
must not end before the consumer has, or the claimed request is sent and never recorded (it stayed
`sending`, and was later failed as `outcome_unknown` although it had been delivered)."""
from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from pydantic import SecretStr

from conduit.peers.smtp import CaptureSmtpServer
from services.dispatch import ledger
from services.dispatch.service import DispatchService
from services.dispatch.settings import DispatchSettings
from shared.crypto import load_cipher
from shared.db.pool import create_pool, database_url
from shared.kafka import Publisher
from shared.lifecycle import run_service
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.databases import scratch_database
from tests.support.dispatch import outbound, publish, sending_mailbox

pytestmark = pytest.mark.peers


async def test_a_stop_during_the_accept_transaction_records_what_that_transaction_claimed(
        settings: Settings, publisher: Publisher, tmp_path, monkeypatch) -> None:
    # A ledger of its own: the accept transaction claims the oldest due rows of the whole ledger, and
    # the session's holds other tests' leftovers, which it would claim instead of this request.
    async with scratch_database(database_url(settings), "stop", migrated=True) as url:
        own = settings.model_copy(update={"database_url": SecretStr(url)})
        pool = await create_pool(own, max_size=4)
        try:
            registry = Registry(pool, load_cipher(own), producer="tests")
            org = await registry.add_organization(f"org-{uuid.uuid4().hex[:12]}")
            await _stop_during_the_accept_transaction(own, registry, org, publisher, pool, tmp_path, monkeypatch)
        finally:
            await pool.close()


async def _stop_during_the_accept_transaction(settings: Settings, registry: Registry, org, publisher: Publisher,
                                              pool: asyncpg.Pool, tmp_path, monkeypatch) -> None:
    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        stopping = asyncio.Event()
        original = ledger.insert_requests

        async def insert_then_stop(conn, rows, *args, **kwargs):
            written = await original(conn, rows, *args, **kwargs)
            stopping.set()               # SIGTERM while the accept transaction is open
            await asyncio.sleep(0.2)     # and its commit is slow: the send loop sees the stop first
            return written

        monkeypatch.setattr(ledger, "insert_requests", insert_then_stop)
        worker = DispatchService(settings, DispatchSettings(poll_seconds=0.1), group_id=f"d-{uuid.uuid4().hex[:8]}")
        running = asyncio.create_task(run_service(worker, stopping=stopping))
        event = outbound(org, mailbox_id=sender.mailbox_id, subject="stopped mid-accept")
        await publish(publisher, event)
        await asyncio.wait_for(running, 60)

        async with pool.acquire() as conn:
            row = await conn.fetchrow("SELECT status, reason FROM outbound_email WHERE organization_id = $1", org.id)
        # Claimed by the accept transaction, hence sent: recorded as sent before the worker ended.
        assert (row["status"], row["reason"]) == ("sent", None), dict(row)
        assert len(capture.messages()) == 1
