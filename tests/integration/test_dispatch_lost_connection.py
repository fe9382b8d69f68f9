"""Dispatch when a connection to PostgreSQL breaks at the worst moment.

A lost COMMIT answer: a worker's transaction that claims rows (``pending_send`` -> ``sending``, this worker's number) may
commit on the server while the connection breaks before the COMMIT's answer arrives
(``tests.support.pgproxy`` stages it).  The worker then cannot tell whether it holds those rows.
Whatever it concludes, each request must still be sent exactly once, and soon: not left in
``sending`` for as long as the worker lives (only a restart used to free them).

A lost lock: the connection that holds a worker's advisory lock breaks while the process lives on.
To the other workers it is dead, and they take its rows back; it must stop rather than go on under
its number (before, it claimed those rows again and sent some of them twice).
"""
from __future__ import annotations

import asyncio
import collections
import uuid

import asyncpg
import pytest
from pydantic import SecretStr

from aiosmtpd.controller import Controller

from conduit.peers.ports import free_port
from conduit.peers.smtp import CaptureSmtpServer
from services.dispatch.ledger import WORKER_LOCK_NAMESPACE
from services.dispatch.service import DispatchService
from services.dispatch.settings import DispatchSettings
from shared.errors import ConnectionFailed
from shared.lifecycle import run_service
from shared.db.pool import database_url
from shared.kafka import Publisher
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.dispatch import dispatch_running, finals, outbound, publish, sending_mailbox
from tests.support.pgproxy import PgProxy
from tests.support.waiting import eventually


@pytest.fixture
def capture(tmp_path):
    with CaptureSmtpServer(tmp_path / "capture") as server:
        yield server


# The claims: a turn's UPDATE of due rows, and the consumer's insert of rows it claims at once.
CLAIMS = {"turn": "SET status = 'sending', attempts", "accept": "THEN 'sending'"}


@pytest.mark.parametrize("where", sorted(CLAIMS))
async def test_a_claim_whose_commit_answer_is_lost_is_sent_once_without_a_restart(
        where: str, settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool,
        capture: CaptureSmtpServer) -> None:
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    async with PgProxy.for_url(database_url(settings)) as proxy:
        proxied = settings.model_copy(update={"database_url": SecretStr(proxy.url)})
        # With room in flight the consumer's insert claims a request at once.  With a wave of one
        # and two requests in a batch, it claims the first, and a turn claims the second once the
        # first is sent (marked: the first statement of the turn's kind that changes a row).
        async with dispatch_running(proxied, wave_size=1 if where == "turn" else 128):
            proxy.lose_commit_ack(CLAIMS[where])
            first = outbound(org, mailbox_id=sender.mailbox_id, to=["first@customer.example"], subject="first")
            event = outbound(org, mailbox_id=sender.mailbox_id, to=["bea@customer.example"], subject="lost ack")
            requests = [first, event] if where == "turn" else [event]
            await publish(publisher, *requests)
            async with asyncio.timeout(20):
                await proxy.lost.wait()
            keys = [e.data.idempotency_key for e in requests]
            reader = await finals(settings, keys)
        assert [reader.final(k).status for k in keys] == ["sent"] * len(keys)
    async with pool.acquire() as conn:
        statuses = await conn.fetch("SELECT status FROM outbound_email WHERE organization_id = $1", org.id)
    assert [r["status"] for r in statuses] == ["sent"] * len(keys)
    subjects = [m.header("Subject") for m in capture.messages()]   # (with the organization's tracking token)
    assert sorted(s.split(" CRM:")[0] for s in subjects) == sorted(e.data.subject for e in requests), subjects


class _SlowServer:
    """An SMTP server that takes a second per message (aiosmtpd): sends queue up for its places."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        await asyncio.sleep(1.0)   # the peer's own pace, not a wait for something in the test
        self.messages.append(envelope.content)
        return "250 OK"


async def test_a_worker_that_loses_its_lock_stops_and_nothing_is_sent_twice(
        settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool) -> None:
    server, port = _SlowServer(), free_port()
    controller = Controller(server, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=port, max_connections=1)
        worker = DispatchService(settings, DispatchSettings(poll_seconds=0.1), group_id=f"d-{uuid.uuid4().hex[:8]}")
        running = asyncio.create_task(run_service(worker, stopping=asyncio.Event()))
        requests = [outbound(org, mailbox_id=sender.mailbox_id, subject=f"lock {i}") for i in range(12)]
        await publish(publisher, *requests)

        async def waiting_for_a_place() -> bool:   # claimed by the worker, not yet cleared to start
            async with pool.acquire() as conn:
                return await conn.fetchval(
                    "SELECT count(*) FROM outbound_email WHERE organization_id = $1 AND status = 'sending' "
                    "AND started_at IS NULL", org.id) >= 5
        await eventually(waiting_for_a_place, timeout=30, what="rows waiting for a place")
        async with pool.acquire() as conn:   # a failover or reset cuts the lock's connection
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1 "
                "AND objid = $2 AND granted", WORKER_LOCK_NAMESPACE, worker.worker_id)
        with pytest.raises(ConnectionFailed, match="lost the database connection that held its lock"):
            await asyncio.wait_for(running, 30)
        # Another worker finds the rows the stopped one left and sends them.
        async with dispatch_running(settings):
            reader = await finals(settings, [e.data.idempotency_key for e in requests], timeout=60)
    finally:
        controller.stop()
    ids = collections.Counter(line.split(b":", 1)[1].strip() for m in server.messages
                              for line in m.split(b"\r\n") if line.lower().startswith(b"message-id:"))
    assert len(ids) == 12 and set(ids.values()) == {1}, ids
    assert {reader.final(e.data.idempotency_key).status for e in requests} == {"sent"}
