"""An administrator's edits of a sending mailbox while dispatch runs (found by a review, helper-77).

- A mailbox deactivated while its requests wait for its one connection sends no more than the few
  already cleared to start (``PLACES_PER_CONNECTION``): the others wait, `pending_send` with reason
  `mailbox_inactive` said once, and are sent, once each, when it is active again.  Dispatch used to
  check the mailbox only when it claimed up to 128 requests, and sent them all.
- A request that waits past its deadline for a mailbox still inactive fails `deadline_exceeded`,
  naming why it waited.

Against a slow scripted SMTP server (0.3 s per message), PostgreSQL and the broker.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from services.dispatch.starts import PLACES_PER_CONNECTION
from shared.kafka import Publisher
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.dispatch import StatusReader, dispatch_running, finals, outbound, publish, sending_mailbox
from tests.support.scripted_smtp import ScriptedSmtpServer, well_behaved
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers

REQUESTS = 20
PER_MESSAGE = 0.3
OPTIONS = dict(mailbox_refresh_seconds=0.2, unavailable_recheck_seconds=0.5, poll_seconds=0.05)


async def _rows(pool: asyncpg.Pool, org_id) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await conn.fetch("SELECT idempotency_key, status, reason FROM outbound_email WHERE organization_id = $1",
                                org_id)


async def test_a_mailbox_deactivated_mid_queue_sends_only_what_was_cleared_and_the_rest_after_reactivation(
        settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool) -> None:
    async with ScriptedSmtpServer(well_behaved(data_delay=PER_MESSAGE)) as server:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=server.port, max_connections=1)
        events = [outbound(org, mailbox_id=sender.mailbox_id, subject=f"m{i}") for i in range(REQUESTS)]
        keys = [e.data.idempotency_key for e in events]
        async with dispatch_running(settings, **OPTIONS), StatusReader(settings) as reader:
            await publish(publisher, *events)
            async def first_sent() -> bool:
                return len(server.contents) >= 1
            await eventually(first_sent, what="the first message sent")
            await registry.update_mailbox(org, sender.email, active=False)
            sent_before = len(server.contents)

            async def none_sending() -> bool:
                rows = await _rows(pool, org.id)
                return len(rows) == REQUESTS and not any(r["status"] == "sending" for r in rows)
            await eventually(none_sending, timeout=30, what="every request settled or waiting")
            sent_while_inactive = len(server.contents) - sent_before
            assert sent_while_inactive <= PLACES_PER_CONNECTION, \
                f"{sent_while_inactive} messages left an inactive mailbox"
            waiting = [r for r in await _rows(pool, org.id) if r["status"] == "pending_send"]
            assert waiting and all(r["reason"] == "mailbox_inactive" for r in waiting)
            for row in waiting:   # said once each, with the reason
                async def told(key=row["idempotency_key"]) -> bool:
                    await reader.poll()
                    return any(s.reason == "mailbox_inactive" for s in reader.by_key.get(key, []))
                await eventually(told, what="a status saying the request waits for its mailbox")

            await registry.update_mailbox(org, sender.email, active=True)
            reader_all = await finals(settings, keys, timeout=60)
    assert [reader_all.final(k).status for k in keys] == ["sent"] * REQUESTS
    assert len(server.contents) == REQUESTS and len(set(server.contents)) == REQUESTS   # each once


async def test_a_request_still_waiting_for_its_mailbox_at_its_deadline_fails_saying_why(
        settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool) -> None:
    async with ScriptedSmtpServer(well_behaved()) as server:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=server.port)
        async with pool.acquire() as conn:   # backing off: the request is accepted and waits
            await conn.execute("UPDATE mailbox SET outgoing_backoff_until = now() + interval '1 hour' WHERE id = $1",
                               sender.mailbox_id)
        async with dispatch_running(settings, **OPTIONS):
            # Long enough for the request to be looked at (and found waiting) before it, on a loaded machine.
            event = outbound(org, mailbox_id=sender.mailbox_id, deadline=datetime.now(timezone.utc) + timedelta(seconds=20))
            key = event.data.idempotency_key
            await publish(publisher, event)
            await eventually(lambda: _rows(pool, org.id), what="the request accepted")
            await registry.update_mailbox(org, sender.email, active=False)
            async with pool.acquire() as conn:   # the back-off ends; the mailbox is still inactive
                await conn.execute("UPDATE mailbox SET outgoing_backoff_until = NULL WHERE id = $1", sender.mailbox_id)
                await conn.execute("UPDATE outbound_email SET next_attempt_at = now() WHERE idempotency_key = $1", key)
            async def waiting() -> bool:
                return any(r["reason"] == "mailbox_inactive" for r in await _rows(pool, org.id))
            await eventually(waiting, timeout=15, what="the request waiting for its mailbox")
            final = (await finals(settings, [key], timeout=45)).final(key)
    assert (final.status, final.reason) == ("failed", "deadline_exceeded"), final
    assert "mailbox_inactive" in final.detail and "is inactive" in final.detail
    assert not server.contents
