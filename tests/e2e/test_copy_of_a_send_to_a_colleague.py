"""An email Conduit sends to a colleague whose mailbox is tracked is one outgoing activity, linked to
both mailboxes, even when the colleague's copy is ingested and evaluated before dispatch has recorded
the send (the server delivered it, and its reply to the final dot has not reached dispatch yet).

The copy waits (held, `being_sent`) while the send is under way, and is linked to the send's outgoing
activity once dispatch records it; it is never an incoming activity of its own.  The wait is bounded:
a send cleared to reach its server long ago (a dispatch that stopped mid-send) holds nothing.

Against a running dispatch and an aiosmtpd server that delivers into Dovecot and holds its reply to
the final dot until the test lets it go, then ingest and evaluate (burst mode), the broker and
PostgreSQL."""
from __future__ import annotations

import asyncio
import threading
import uuid

import asyncpg
import pytest
from aiosmtpd.controller import Controller

from conduit.peers.ports import free_port
from services.evaluate.service import EvaluateService
from services.ingest.service import IngestService
from shared.kafka import Publisher
from shared.lifecycle import run_service
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.dispatch import dead_worker, dispatch_running, orphan_row, outbound, publish, sending_mailbox
from tests.support.mailboxes import imap_profile, message, ready_mailbox
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers


class _DeliversThenHoldsItsReply:
    """An aiosmtpd handler: delivers each message into Dovecot at once, and answers the final dot only
    once ``answer`` is set, as a server slow to confirm what it already delivered."""

    def __init__(self, dovecot) -> None:
        self.dovecot = dovecot
        self.delivered = threading.Event()
        self.answer = threading.Event()

    async def handle_DATA(self, server, session, envelope) -> str:
        for recipient in envelope.rcpt_tos:
            self.dovecot.deliver(recipient, envelope.original_content)
        self.delivered.set()
        await asyncio.to_thread(self.answer.wait, 60)
        return "250 2.0.0 delivered"


async def _request(pool: asyncpg.Pool, org, key: str) -> asyncpg.Record:
    async with pool.acquire() as conn:
        return await conn.fetchrow("SELECT status, message_id, activity_id FROM outbound_email "
                                   "WHERE organization_id = $1 AND idempotency_key = $2", org.id, key)


async def _activities(pool: asyncpg.Pool, org, message_id: str) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await conn.fetch(
            """SELECT a.id, a.direction, array_agg(l.mailbox_id ORDER BY l.mailbox_id) AS mailboxes
               FROM email_activity a LEFT JOIN email_activity_mailbox l ON l.activity_id = a.id
               WHERE a.organization_id = $1 AND a.message_id = $2 GROUP BY a.id""", org.id, message_id)


async def _decision(registry: Registry, org, message_id: str, mailbox_id) -> tuple[bool, str]:
    [decision] = [d for d in await registry.decisions(org, message_id) if d.mailbox_id == mailbox_id]
    return decision.tracked, decision.reason


async def _ingest_and_evaluate(settings: Settings) -> None:
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)


async def test_a_colleagues_copy_read_before_the_send_is_recorded_joins_the_outgoing_activity(
        settings: Settings, registry: Registry, org, dovecot, pool: asyncpg.Pool, publisher: Publisher) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    colleague = await ready_mailbox(registry, org, dovecot, tracking="all", profile="dovecot-imap")
    server, port = _DeliversThenHoldsItsReply(dovecot), free_port()
    controller = Controller(server, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=port)
        key = f"colleague-{uuid.uuid4().hex[:8]}"
        async with dispatch_running(settings):
            await publish(publisher, outbound(org, idempotency_key=key, mailbox_id=sender.mailbox_id,
                                              to=[colleague.email], subject="Minutes of today"))
            async def delivered() -> bool:
                return server.delivered.is_set()
            await eventually(delivered, timeout=30, what="the colleague's copy delivered")
            # The server has the message and dispatch waits for its reply: the copy is read now.
            await _ingest_and_evaluate(settings)
            request = await _request(pool, org, key)
            assert request["status"] == "sending"
            message_id = request["message_id"]
            assert await _decision(registry, org, message_id, colleague.id) == (False, "being_sent")
            assert await _activities(pool, org, message_id) == []

            server.answer.set()

            async def sent() -> bool:
                return (await _request(pool, org, key))["status"] == "sent"
            await eventually(sent, timeout=30, what="the send recorded")
    finally:
        server.answer.set()
        controller.stop()

    await run_service(EvaluateService(settings), burst=True)   # evaluates held messages again at start
    [activity] = await _activities(pool, org, message_id)
    assert activity["direction"] == "outgoing"
    assert activity["id"] == (await _request(pool, org, key))["activity_id"]
    assert sorted(activity["mailboxes"]) == sorted([sender.mailbox_id, colleague.id])
    assert await _decision(registry, org, message_id, colleague.id) == (True, "already_tracked")


@pytest.mark.parametrize("cleared", ["a moment ago", "an hour ago"])
async def test_a_copy_waits_for_a_send_only_while_it_may_still_be_recorded(
        settings: Settings, registry: Registry, org, dovecot, pool: asyncpg.Pool, cleared: str) -> None:
    """A send cleared to reach its server an hour ago, by a dispatch worker that is gone, holds its
    copy no longer (``CONDUIT_EVALUATE_SEND_WAIT_SECONDS``, 2 minutes): it is evaluated as any mail;
    one cleared a moment ago holds it until the send has ended (here: failed, its outcome unknown)."""
    await registry.add_profile(org, imap_profile(dovecot))
    colleague = await ready_mailbox(registry, org, dovecot, tracking="all", profile="dovecot-imap")
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=free_port())
    message_id = f"{uuid.uuid4().hex}@example.com"
    async with pool.acquire() as conn:
        await orphan_row(conn, await dead_worker(conn), org.id, sender.mailbox_id, f"k-{uuid.uuid4().hex[:8]}",
                         message_id)
        if cleared == "an hour ago":
            await conn.execute("UPDATE outbound_email SET started_at = now() - interval '1 hour' "
                               "WHERE organization_id = $1 AND message_id = $2", org.id, message_id)
    dovecot.deliver(colleague.email, message("Minutes of today", sender=sender.email, to=colleague.email,
                                             message_id=f"<{message_id}>"))
    await _ingest_and_evaluate(settings)
    if cleared == "a moment ago":
        assert await _decision(registry, org, message_id, colleague.id) == (False, "being_sent")
        assert await _activities(pool, org, message_id) == []
        # The dead worker's send ends as dispatch ends it (its outcome unknown): the copy waits no
        # more, and the next release evaluates it.  (Nothing is left held for a later test's release.)
        async with pool.acquire() as conn:
            await conn.execute("UPDATE outbound_email SET status = 'failed', reason = 'outcome_unknown', worker_id = NULL "
                               "WHERE organization_id = $1 AND message_id = $2", org.id, message_id)
        await run_service(EvaluateService(settings), burst=True)
    assert await _decision(registry, org, message_id, colleague.id) == (True, "tracked_all")
    [activity] = await _activities(pool, org, message_id)
    assert activity["direction"] == "incoming"
