"""Dispatch when PostgreSQL commits a claim and the answer never reaches the worker.

A worker's transaction that claims rows (``pending_send`` -> ``sending``, this worker's number) may
commit on the server while the connection breaks before the COMMIT's answer arrives
(``tests.support.pgproxy`` stages it).  The worker then cannot tell whether it holds those rows.
Whatever it concludes, each request must still be sent exactly once, and soon: not left in
``sending`` for as long as the worker lives (only a restart used to free them).
"""
from __future__ import annotations

import asyncio

import asyncpg
import pytest
from pydantic import SecretStr

from conduit.peers.smtp import CaptureSmtpServer
from shared.db.pool import database_url
from shared.kafka import Publisher
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.dispatch import dispatch_running, finals, outbound, publish, sending_mailbox
from tests.support.pgproxy import PgProxy


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
