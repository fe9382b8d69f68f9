"""Dispatch through Exchange, end to end: `email.outbound` on the broker -> DispatchService (burst
mode) -> the Exchange simulator over EWS (exchangelib) or Microsoft Graph ``sendMail`` -> the final
status on `email.status`, the copy in the sender's Sent Items and the message in the recipient's Inbox
(both mailboxes of the simulated organization), all with the Message-ID the send ledger generated.

A refusal by Exchange is a permanent failure with the server's code in the reason's detail, never
retried; a throttled send is retried after the server's back-off hint and sent once; a send whose
answer is lost (late, or its connection dropped once it was written) is looked for in Sent Items,
never sent again; looked for again for a bounded window when its copy is not there yet (Graph answers
``sendMail`` 202 before it has sent: the simulator's ``file_sent_late``).  A Graph ``sendMail`` answered
504 (a gateway that gave up waiting) is looked for in Sent Items before it is retried: sent once either
way, whether Exchange had sent it (the simulator's ``fail_after_serving``) or not.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import trustme
from exchangelib.protocol import CachingProtocol
from pydantic import SecretStr

from services.dispatch.service import DispatchService
from services.dispatch.settings import DispatchSettings
from services.dispatch.transports import Transports
from shared.events.envelope import Envelope
from shared.events.payloads import EmailOutboundV1
from shared.kafka import Publisher
from shared.lifecycle import run_service
from shared.registry.models import Organization
from shared.registry.service import ProfileInput, Registry
from shared.settings import Settings
from simulators.exchange import ExchangeSimulator, Fault, SentRecord
from tests.support.dispatch import StatusReader, dead_worker, finals, orphan_row, outbound, publish
from tests.support.waiting import eventually

PASSWORD = "mailbox-password-123"
APP_ID, APP_SECRET = "0c5d7a8e-1111-2222-3333-444455556666", "graph-app-secret"
SEND = {"ews": "CreateItem", "graph": "sendMail"}  # the operation that sends, per transport


@pytest.fixture(autouse=True)
def isolated_exchangelib_cache():
    CachingProtocol.clear_cache()
    yield
    CachingProtocol.clear_cache()


@pytest.fixture
async def sim() -> AsyncIterator[ExchangeSimulator]:
    async with ExchangeSimulator(domain="contoso.test") as s:
        yield s


def _address(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}@contoso.test"


@dataclass
class ExchangeDispatch:
    """One test's organization, topics and simulated Exchange, and the steps every test here takes:
    a sending mailbox, then publish, dispatch (burst mode) and read the final statuses."""

    settings: Settings
    registry: Registry
    org: Organization
    publisher: Publisher
    sim: ExchangeSimulator

    async def sender(self, kind: str, *, app_mailboxes: set[str] | None = None) -> str:
        """A user whose mailbox sends through ``kind`` (``ews`` or ``graph``) on the simulator; its address."""
        registry, org, sim = self.registry, self.org, self.sim
        email = _address("sender")
        sim.add_mailbox(email, password=PASSWORD, display_name="Sender")
        profile = f"{kind}-{uuid.uuid4().hex[:6]}"
        if kind == "ews":
            spec = ProfileInput(name=profile, server_type="exchange_server", service_url=sim.ews_url,
                                auth_method="mailbox_credentials", max_concurrent_connections=4)
        else:
            client_id = f"{APP_ID[:-6]}{uuid.uuid4().hex[:6]}"
            sim.add_app(client_id, APP_SECRET, mailboxes=app_mailboxes)
            spec = ProfileInput(name=profile, server_type="exchange_online", service_url=sim.graph_url,
                                auth_method="oauth2", oauth_token_url=sim.token_url, oauth_client_id=client_id,
                                oauth_client_secret=SecretStr(APP_SECRET), max_concurrent_connections=4)
        await registry.add_profile(org, spec)
        await registry.add_user(org, "Sender", email)
        if kind == "ews":
            await registry.set_credentials(org, email, email, SecretStr(PASSWORD))
        await registry.update_mailbox(org, email, email_approved=True, profile=profile)
        mailbox = await registry.mailbox(org, email)
        await registry.record_test(mailbox.id, "outgoing", True, "ok")
        return email

    def request(self, sender: str, **data: Any) -> Envelope[EmailOutboundV1]:
        data.setdefault("to", ["buyer@customer.example"])
        return outbound(self.org, sender_email=sender, **data)

    async def dispatch(self, *events: Envelope[EmailOutboundV1], **options: Any) -> StatusReader:
        """Publish ``events``, run dispatch until it is idle, and return their statuses once each is final."""
        await publish(self.publisher, *events)
        await self.run(**options)
        return await self.finals([e.data.idempotency_key for e in events])

    async def run(self, **options: Any) -> None:
        options.setdefault("retry_base_seconds", 0.05)
        options.setdefault("poll_seconds", 0.1)
        service = DispatchService(self.settings, DispatchSettings(**options),
                                  group_id=f"dispatch-{uuid.uuid4().hex[:8]}")
        await run_service(service, burst=True)

    @contextlib.asynccontextmanager
    async def running(self, **options: Any) -> AsyncIterator[asyncio.Task[None]]:
        """Dispatch running as a deployment runs it (not burst) while the block runs, then stopped as by
        SIGTERM (the block's end waits for the stop); yields the running service's task at once."""
        options.setdefault("poll_seconds", 0.1)
        service = DispatchService(self.settings, DispatchSettings(**options), group_id=f"dispatch-{uuid.uuid4().hex[:8]}")
        stopping = asyncio.Event()
        task = asyncio.create_task(run_service(service, stopping=stopping))
        try:
            yield task
        finally:
            stopping.set()
            await task

    async def finals(self, keys: list[str]) -> StatusReader:
        return await finals(self.settings, keys, timeout=30)

    def submitted(self, message_id: str) -> list[SentRecord]:
        """What the simulated Exchange sent with this Message-ID (given without angle brackets)."""
        return [r for r in self.sim.sent if r.message_id == f"<{message_id}>"]


@pytest.fixture
async def exchange(settings: Settings, registry: Registry, org: Organization, publisher: Publisher,
                   sim: ExchangeSimulator) -> ExchangeDispatch:
    return ExchangeDispatch(settings, registry, org, publisher, sim)


@pytest.mark.parametrize("kind", ["ews", "graph"])
async def test_sent_through_exchange_lands_in_sent_items_and_the_recipients_inbox(
        kind: str, exchange: ExchangeDispatch, pool: asyncpg.Pool) -> None:
    sim, org = exchange.sim, exchange.org
    sender = await exchange.sender(kind)
    recipient = _address("rcpt")
    sim.add_mailbox(recipient, password=PASSWORD)
    event = exchange.request(sender, to=[recipient], cc=["partner@customer.example"], subject=f"Quote via {kind}",
                             text="Please find the quote.\n", headers={"X-Campaign": "q4"})
    reader = await exchange.dispatch(event)

    key = event.data.idempotency_key
    assert reader.statuses(key) == ["pending_send", "sending", "sent"]
    final = reader.final(key)
    assert final.activity_id is not None and final.message_id
    message_id = f"<{final.message_id}>"

    (copy,) = [i for i in sim.items(sender, "sentitems") if i.internet_message_id == message_id]
    assert copy.subject.startswith(f"Quote via {kind}")
    assert [a.email for a in copy.to] == [recipient]
    (delivered,) = [i for i in sim.items(recipient, "inbox") if i.internet_message_id == message_id]
    assert delivered.from_ is not None and delivered.from_.email == sender
    assert ("X-Campaign", "q4") in delivered.headers
    (record,) = exchange.submitted(final.message_id)
    assert record.protocol == kind and "partner@customer.example" in record.recipients

    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM outbound_email WHERE organization_id = $1 AND idempotency_key = $2",
                                  org.id, key)
        activity = await conn.fetchrow("SELECT * FROM email_activity WHERE id = $1", final.activity_id)
    assert row["status"] == "sent" and row["transport"] == kind and row["worker_id"] is None
    assert activity["direction"] == "outgoing" and activity["message_id"] == final.message_id

    await exchange.dispatch(event)  # a replay of the same request: a no-op
    assert len(exchange.submitted(final.message_id)) == 1


async def test_graph_refusal_is_a_permanent_failure_with_the_servers_reason(exchange: ExchangeDispatch) -> None:
    # The app's application access policy does not cover the sender's mailbox: Graph answers 403.
    sender = await exchange.sender("graph", app_mailboxes={"someone-else@contoso.test"})
    event = exchange.request(sender)
    reader = await exchange.dispatch(event, burst_horizon_seconds=2)

    key = event.data.idempotency_key
    assert reader.statuses(key) == ["pending_send", "sending", "failed"]
    final = reader.final(key)
    assert final.reason == "rejected" and final.attempt == 1
    assert "403" in final.detail and "ErrorAccessDenied" in final.detail
    assert exchange.sim.sent == []


async def test_ews_refusal_is_a_permanent_failure_with_the_servers_reason(exchange: ExchangeDispatch) -> None:
    # The mailbox signs in as another user, who has no right to send as it: EWS refuses the message.
    sender = await exchange.sender("ews")
    other = _address("other")
    exchange.sim.add_mailbox(other, password=PASSWORD)
    exchange.sim.grant_full_access(sender, other)
    await exchange.registry.set_credentials(exchange.org, sender, other, SecretStr(PASSWORD))
    event = exchange.request(sender)
    reader = await exchange.dispatch(event, burst_horizon_seconds=2)

    key = event.data.idempotency_key
    assert reader.statuses(key) == ["pending_send", "sending", "failed"]
    final = reader.final(key)
    assert final.reason == "rejected" and final.attempt == 1
    assert "ErrorSendAsDenied" in final.detail
    assert exchange.sim.sent == []


async def test_graph_throttling_is_retried_after_the_servers_hint_and_sent_once(exchange: ExchangeDispatch) -> None:
    sender = await exchange.sender("graph")
    exchange.sim.graph_throttle(retry_after=0.2, operation="sendMail")
    event = exchange.request(sender)
    reader = await exchange.dispatch(event, burst_horizon_seconds=5)

    key = event.data.idempotency_key
    assert reader.statuses(key) == ["pending_send", "sending", "pending_send", "sending", "sent"]
    assert reader.by_key[key][2].reason == "throttled"
    assert len(exchange.submitted(reader.final(key).message_id)) == 1


@pytest.mark.parametrize("kind", ["ews", "graph"])
async def test_a_dead_workers_sends_are_resolved_from_sent_items(
        kind: str, exchange: ExchangeDispatch, pool: asyncpg.Pool) -> None:
    """A worker died mid-send: the copy in Sent Items says which of its messages went out."""
    sim, org = exchange.sim, exchange.org
    sender = await exchange.sender(kind)
    mailbox = await exchange.registry.mailbox(org, sender)
    went, lost = f"conduit.{uuid.uuid4().hex}@contoso.test", f"conduit.{uuid.uuid4().hex}@contoso.test"
    sim.deliver(sender, (f"From: Sender <{sender}>\r\nTo: buyer@customer.example\r\nSubject: Went out\r\n"
                         f"Message-ID: <{went}>\r\nDate: Fri, 27 Nov 2026 09:00:00 +0000\r\n\r\nHello\r\n").encode(),
                folder="sentitems")
    request = exchange.request(sender, subject="Went out").data
    async with pool.acquire() as conn:
        dead = await dead_worker(conn)
        for key, message_id in ((f"went-{kind}", went), (f"lost-{kind}", lost)):
            await orphan_row(conn, dead, org.id, mailbox.id, key, message_id, subject="Went out",
                             request=request.model_dump_json(exclude_defaults=True))
    await exchange.run(sent_items_window_seconds=1)  # the lost one is looked for again for 1 s

    reader = await exchange.finals([f"went-{kind}", f"lost-{kind}"])
    sent, unknown = reader.final(f"went-{kind}"), reader.final(f"lost-{kind}")
    assert sent.status == "sent" and sent.activity_id is not None and "Sent Items" in sent.smtp_reply
    assert unknown.status == "failed" and unknown.reason == "outcome_unknown" and lost in unknown.detail
    async with pool.acquire() as conn:
        activity = await conn.fetchrow("SELECT * FROM email_activity WHERE id = $1", sent.activity_id)
    assert activity["message_id"] == went and activity["direction"] == "outgoing"
    assert sim.sent == []  # nothing was (re)sent


@pytest.mark.parametrize("kind", ["ews", "graph"])
async def test_a_lost_answer_is_resolved_from_sent_items_not_resent(kind: str, exchange: ExchangeDispatch) -> None:
    """Exchange sends the message but its answer comes after our timeout: Sent Items says it went out."""
    sender = await exchange.sender(kind)
    exchange.sim.answer_late(kind, 4.0, operation=SEND[kind])
    event = exchange.request(sender)
    reader = await exchange.dispatch(event, smtp_timeout_seconds=0.5, burst_horizon_seconds=2)

    key = event.data.idempotency_key
    assert reader.statuses(key) == ["pending_send", "sending", "sent"]
    final = reader.final(key)
    assert "Sent Items" in final.smtp_reply and final.activity_id is not None
    assert len(exchange.submitted(final.message_id)) == 1


@pytest.mark.parametrize("kind", ["ews", "graph"])
async def test_a_connection_dropped_after_the_send_is_resolved_from_sent_items_not_resent(
        kind: str, exchange: ExchangeDispatch) -> None:
    """Exchange sends a message, then the connection drops before the answer, while the mailbox's other
    sends are in flight (as under load; exchangelib then holds several sessions): every message is
    delivered once and ends sent, the dropped one resolved from Sent Items."""
    sim = exchange.sim
    sender = await exchange.sender(kind)
    recipient = _address("rcpt")
    sim.add_mailbox(recipient, password=PASSWORD)
    sim.answer_late(kind, 0.5, operation=SEND[kind], times=3)  # the first three are still in flight...
    sim.drop_connection(kind, operation=SEND[kind])  # ...when the fourth is sent and its connection drops
    events = [exchange.request(sender, to=[recipient], subject=f"Part {n}") for n in range(4)]
    # A horizon past the back-off a retry would wait (exchangelib's ErrorServerBusy hint): a resend
    # would show here, not go unseen after the run.
    reader = await exchange.dispatch(*events, burst_horizon_seconds=15)

    keys = [e.data.idempotency_key for e in events]
    finals = [reader.final(k) for k in keys]
    for final in finals:  # each delivered exactly once
        message_id = f"<{final.message_id}>"
        copies = [i for i in sim.items(sender, "sentitems") if i.internet_message_id == message_id]
        delivered = [i for i in sim.items(recipient) if i.internet_message_id == message_id]
        assert (len(exchange.submitted(final.message_id)), len(copies), len(delivered)) == (1, 1, 1), final
    assert [reader.statuses(k) for k in keys] == [["pending_send", "sending", "sent"]] * 4  # none retried
    assert sum("Sent Items" in (f.smtp_reply or "") for f in finals) == 1  # the dropped one, resolved


async def test_a_graph_send_answered_504_after_exchange_sent_it_is_found_in_sent_items_not_resent(
        exchange: ExchangeDispatch) -> None:
    """Exchange Online sends the message, then the gateway in front of it answers sendMail 504: the copy
    in Sent Items says it went out, so it ends sent, delivered once, with no retry."""
    sim = exchange.sim
    sender, recipient = await _sender_and_recipient(exchange, "graph")
    sim.fail_after_serving("graph", 504, operation="sendMail")
    event = exchange.request(sender, to=[recipient])
    # A horizon past the retry's back-off: a resend would show here, not go unseen after the run.
    reader = await exchange.dispatch(event, burst_horizon_seconds=5)

    key = event.data.idempotency_key
    assert reader.statuses(key) == ["pending_send", "sending", "sent"], reader.by_key[key]
    final = reader.final(key)
    assert final.activity_id is not None
    _delivered_once(exchange, final, recipient)
    message_id = f"<{final.message_id}>"
    assert len([i for i in sim.items(sender, "sentitems") if i.internet_message_id == message_id]) == 1
    assert _looks(sim, "graph") == 1  # found at the first look


async def test_a_graph_send_answered_504_before_exchange_sent_it_is_retried_and_sent_once(
        exchange: ExchangeDispatch) -> None:
    """The gateway answers sendMail 504 and Exchange Online never got the message: not in Sent Items
    for the whole window (1 s here), so it is retried, and sent once."""
    sim = exchange.sim
    sender, recipient = await _sender_and_recipient(exchange, "graph")
    sim.inject("graph", Fault(504, "GatewayTimeout", "The upstream server did not answer in time.",
                              operation="sendMail"))
    event = exchange.request(sender, to=[recipient])
    reader = await exchange.dispatch(event, burst_horizon_seconds=5, sent_items_window_seconds=1.0)

    key = event.data.idempotency_key
    assert reader.statuses(key) == ["pending_send", "sending", "pending_send", "sending", "sent"]
    retried = reader.by_key[key][2]
    assert "504" in retried.detail and "not in the mailbox's Sent Items" in retried.detail, retried
    # At 0, 0.5 and 1 s (the window's end), and once more as the retry begins.
    assert 4 <= _looks(sim, "graph") <= 5
    final = reader.final(key)
    _delivered_once(exchange, final, recipient)


async def test_a_504_whose_copy_is_filed_after_the_window_is_found_before_the_retry_sends_again(
        exchange: ExchangeDispatch) -> None:
    """Exchange Online sends the message and files its copy 2 s later; the gateway answers 504 at once.
    The look-ups of the 1 s window miss the copy, so the send is retried; the retry looks in Sent Items
    before it sends, finds the copy, and the message is not sent a second time."""
    sim = exchange.sim
    sender, recipient = await _sender_and_recipient(exchange, "graph")
    sim.fail_after_serving("graph", 504, operation="sendMail")
    sim.file_sent_late("graph", 2.0)
    event = exchange.request(sender, to=[recipient])
    # The retry comes 1.5-3 s after the window: after the copy is filed.
    reader = await exchange.dispatch(event, retry_base_seconds=3, burst_horizon_seconds=8, sent_items_window_seconds=1.0)

    key = event.data.idempotency_key
    assert reader.statuses(key) == ["pending_send", "sending", "pending_send", "sending", "sent"], reader.by_key[key]
    final = reader.final(key)
    assert "before sending again" in final.smtp_reply and final.activity_id is not None, final
    assert len(exchange.submitted(final.message_id)) == 1  # sendMail reached Exchange once
    _delivered_once(exchange, final, recipient)


async def test_an_ews_send_answered_by_a_gateways_504_is_found_in_sent_items_not_resent(
        exchange: ExchangeDispatch) -> None:
    """A gateway in front of Exchange Server answers CreateItem with a bare 504 page (no SOAP, which
    exchangelib reports as a malformed answer) after Exchange sent the message: it is looked for in
    Sent Items and ends sent, delivered once."""
    sim = exchange.sim
    sender, recipient = await _sender_and_recipient(exchange, "ews")
    sim.fail_after_serving("ews", 504, operation="CreateItem")
    event = exchange.request(sender, to=[recipient])
    reader = await exchange.dispatch(event, burst_horizon_seconds=5)

    key = event.data.idempotency_key
    assert reader.statuses(key) == ["pending_send", "sending", "sent"], reader.by_key[key]
    final = reader.final(key)
    assert "Sent Items" in (final.smtp_reply or ""), final
    _delivered_once(exchange, final, recipient)


async def test_a_message_too_large_for_graph_is_rejected_on_arrival(exchange: ExchangeDispatch) -> None:
    """Graph's sendMail takes at most 4 MB of base64 MIME: a larger request through a Graph mailbox is
    refused when it arrives (rejected, dead-lettered), not failed when it is sent."""
    sender = await exchange.sender("graph")
    event = exchange.request(sender, text="x" * 3_500_000)
    reader = await exchange.dispatch(event)
    final = reader.final(event.data.idempotency_key)
    assert (final.status, final.reason) == ("rejected", "too_large"), final
    assert not exchange.sim.graph.requests.count("sendMail")


async def _sender_and_recipient(exchange: ExchangeDispatch, kind: str) -> tuple[str, str]:
    """A sender through ``kind`` and a recipient, both mailboxes of the simulated organization."""
    sender, recipient = await exchange.sender(kind), _address("rcpt")
    exchange.sim.add_mailbox(recipient, password=PASSWORD)
    return sender, recipient


def _delivered_once(exchange: ExchangeDispatch, final: Any, recipient: str) -> None:
    """Submitted once, and one copy in the recipient's Inbox."""
    message_id = f"<{final.message_id}>"
    assert len(exchange.submitted(final.message_id)) == 1
    assert len([i for i in exchange.sim.items(recipient) if i.internet_message_id == message_id]) == 1


def _lose_the_answer(sim: ExchangeSimulator, kind: str, loss: str) -> dict[str, Any]:
    """The next send through ``kind`` is carried out but its answer is lost: ``late`` (after our timeout)
    or ``dropped`` (the connection closed once the request was written); the dispatch options it needs."""
    if loss == "late":
        sim.answer_late(kind, 4.0, operation=SEND[kind])
        return {"smtp_timeout_seconds": 0.5}
    sim.drop_connection(kind, operation=SEND[kind])
    return {}


def _looks(sim: ExchangeSimulator, kind: str) -> int:
    """How many times the simulator was asked for messages: the Sent Items look-ups, in these tests."""
    return sim.graph.requests.count("messages") if kind == "graph" else sim.ews.requests.count("FindItem")


@pytest.mark.parametrize("kind,loss", [("graph", "late"), ("graph", "dropped"), ("ews", "dropped")])
async def test_a_lost_answer_whose_copy_is_filed_late_is_found_by_looking_again(
        kind: str, loss: str, exchange: ExchangeDispatch) -> None:
    """Graph answers sendMail before it has sent: the answer is lost and the Sent Items copy comes 2 s
    later, so the first look-up misses it; looking again within the window finds it: sent, once."""
    sim = exchange.sim
    sender = await exchange.sender(kind)
    recipient = _address("rcpt")
    sim.add_mailbox(recipient, password=PASSWORD)
    options = _lose_the_answer(sim, kind, loss)
    sim.file_sent_late(kind, 2.0)
    event = exchange.request(sender, to=[recipient])
    reader = await exchange.dispatch(event, sent_items_window_seconds=10, **options)

    key = event.data.idempotency_key
    assert reader.statuses(key) == ["pending_send", "sending", "sent"], reader.final(key)
    final = reader.final(key)
    assert "Sent Items" in final.smtp_reply and final.activity_id is not None
    (record,) = exchange.submitted(final.message_id)  # accepted once, never resent
    assert record.filed_at is not None and record.filed_at - record.at >= 2.0
    message_id = f"<{final.message_id}>"
    assert len([i for i in sim.items(sender, "sentitems") if i.internet_message_id == message_id]) == 1
    assert len([i for i in sim.items(recipient) if i.internet_message_id == message_id]) == 1
    assert _looks(sim, kind) >= 2  # missed, then found


async def test_with_the_window_at_zero_a_copy_filed_late_is_missed(exchange: ExchangeDispatch) -> None:
    """The same Graph send with ``sent_items_window_seconds=0`` (one look-up, the old behaviour): it went
    out, yet ends ``outcome_unknown``: what the window is for (and proof the test above can fail)."""
    sim = exchange.sim
    sender = await exchange.sender("graph")
    options = _lose_the_answer(sim, "graph", "dropped")
    sim.file_sent_late("graph", 2.0)
    event = exchange.request(sender)
    reader = await exchange.dispatch(event, sent_items_window_seconds=0, **options)

    key = event.data.idempotency_key
    assert reader.statuses(key) == ["pending_send", "sending", "failed"]
    final = reader.final(key)
    assert final.reason == "outcome_unknown" and "not in the mailbox's Sent Items" in final.detail
    assert _looks(sim, "graph") == 1
    (record,) = exchange.submitted(final.message_id)  # not resent...
    assert record.filed_at is not None  # ...and it did go out (filed by now)


async def test_a_copy_that_never_appears_ends_outcome_unknown_after_the_window(exchange: ExchangeDispatch) -> None:
    """Looking again is bounded: a copy that never shows up ends ``outcome_unknown`` once the window has
    passed, after a handful of look-ups with growing pauses (0, 0.5, 1.5 s, then the window's end)."""
    sim = exchange.sim
    sender = await exchange.sender("graph")
    options = _lose_the_answer(sim, "graph", "dropped")
    sim.file_sent_late("graph", 3600.0)
    window = 3.0
    event = exchange.request(sender)
    started = time.monotonic()
    reader = await exchange.dispatch(event, sent_items_window_seconds=window, **options)

    key = event.data.idempotency_key
    assert reader.statuses(key) == ["pending_send", "sending", "failed"]
    final = reader.final(key)
    assert final.reason == "outcome_unknown" and "not in the mailbox's Sent Items" in final.detail
    looked = float(re.search(r"looked for ([0-9.]+) s", final.detail).group(1))  # type: ignore[union-attr]
    assert window <= looked < window + 2.0, final.detail
    assert 4 <= _looks(sim, "graph") <= 5
    assert time.monotonic() - started < window + 30
    assert len(exchange.submitted(final.message_id)) == 1


async def test_a_stop_ends_the_look_ups_without_waiting_out_the_window(exchange: ExchangeDispatch) -> None:
    """A service stopping while it looks again for a lost answer's copy stops looking at once: the send
    is recorded as interrupted (``outcome_unknown``, never resent), and the stop does not wait the window."""
    sim = exchange.sim
    sender = await exchange.sender("graph")
    _lose_the_answer(sim, "graph", "dropped")
    sim.file_sent_late("graph", 3600.0)
    event = exchange.request(sender)
    async with exchange.running(sent_items_window_seconds=300) as running:
        await publish(exchange.publisher, event)

        async def looking() -> bool:
            assert not running.done(), running
            return _looks(sim, "graph") >= 2  # missed once, looked again: now in a pause
        await eventually(looking, timeout=30, what="a second look in Sent Items")
        stopped = time.monotonic()
    assert time.monotonic() - stopped < 10  # stopped (the block's end) long before the window's end

    key = event.data.idempotency_key
    reader = await exchange.finals([key])
    assert reader.statuses(key) == ["pending_send", "sending", "failed"]
    final = reader.final(key)
    assert final.reason == "outcome_unknown" and "cut short" in final.detail
    assert len(exchange.submitted(final.message_id)) == 1


@pytest.mark.parametrize("window,status", [(10.0, "sent"), (0.0, "failed")])
async def test_a_dead_workers_send_filed_late_is_found_within_the_window(
        window: float, status: str, exchange: ExchangeDispatch, pool: asyncpg.Pool) -> None:
    """A worker died a moment after Graph took its send, whose Sent Items copy comes 2 s later: the running
    worker that resolves the row looks again until the window (from the row's creation) passes and finds
    it; with the window at 0 it looks once, misses it, and the row ends ``outcome_unknown``."""
    sim, org = exchange.sim, exchange.org
    sender = await exchange.sender("graph")
    mailbox = await exchange.registry.mailbox(org, sender)
    message_id, key = f"conduit.{uuid.uuid4().hex}@contoso.test", f"late-{uuid.uuid4().hex[:8]}"
    request = exchange.request(sender, subject="Filed late").data
    async with exchange.running(sent_items_window_seconds=window):
        first = exchange.request(sender)  # sent once the worker runs: from then on it looks for orphans
        await publish(exchange.publisher, first)
        await exchange.finals([first.data.idempotency_key])
        looks = _looks(sim, "graph")
        async with pool.acquire() as conn:
            await orphan_row(conn, await dead_worker(conn), org.id, mailbox.id, key, message_id, subject="Filed late",
                             request=request.model_dump_json(exclude_defaults=True))
        # What the dead worker's sendMail left behind: accepted by Graph, filed in Sent Items 2 s later.
        sim.file_sent_late("graph", 2.0)
        sim.org.submit("graph", sim.mailbox(sender), (
            f"From: Sender <{sender}>\r\nTo: buyer@customer.example\r\nSubject: Filed late\r\n"
            f"Message-ID: <{message_id}>\r\nDate: Fri, 27 Nov 2026 09:00:00 +0000\r\n\r\nHello\r\n").encode())
        final = (await exchange.finals([key])).final(key)

    assert final.status == status, final
    if status == "sent":
        assert "Sent Items" in final.smtp_reply and final.activity_id is not None
        assert _looks(sim, "graph") - looks >= 2
    else:
        assert final.reason == "outcome_unknown" and _looks(sim, "graph") - looks == 1
    assert len(exchange.submitted(message_id)) == 1  # nothing was resent


async def _send_directly(transports: Transports, registry: Registry, mailbox_id, sender: str, subject: str) -> None:
    """A message through one dispatch worker's transports, as dispatch hands it over (white-box)."""
    (work,) = await registry.mailboxes_to_process("outgoing", mailbox_ids=[mailbox_id])
    raw = (f"From: {sender}\r\nTo: buyer@customer.example\r\nSubject: {subject}\r\n"
           f"Message-ID: <{uuid.uuid4().hex}@conduit.test>\r\n\r\nHello.\r\n").encode()
    await transports.send(work, raw, ["buyer@customer.example"])


@pytest.mark.parametrize("kind", ["ews", "graph"])
async def test_an_edited_profile_gets_a_new_transport_and_the_old_one_closes(kind: str, exchange: ExchangeDispatch) -> None:
    """White-box (the transports of one dispatch worker): a profile edited while dispatch runs (here its
    connection limit) is sent through a transport built with the new settings, and the replaced one is
    closed rather than kept for the worker's life."""
    registry, org = exchange.registry, exchange.org
    sender = await exchange.sender(kind)
    mailbox = await registry.mailbox(org, sender)

    async def send(subject: str) -> None:
        await _send_directly(transports, registry, mailbox.id, sender, subject)

    transports = Transports(timeout=10)
    try:
        await send("before the edit")
        (before,) = transports._exchange.values()
        await registry.update_profile(org, mailbox.profile_name, max_concurrent_connections=2)
        await send("after the edit")
        (after,) = transports._exchange.values()
        assert after.transport is not before.transport and after.settings != before.settings
        await asyncio.gather(*transports._closing)
        closed = before.transport._closed if kind == "ews" else before.transport._client.is_closed
        assert closed and not (after.transport._closed if kind == "ews" else after.transport._client.is_closed)
    finally:
        await transports.close()
    assert sorted(r.protocol for r in exchange.sim.sent) == [kind, kind]


@pytest.mark.parametrize("kind", ["ews", "graph"])
async def test_an_exchange_transport_unused_for_a_while_is_closed(kind: str, exchange: ExchangeDispatch,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """White-box: a profile whose mailboxes sign in with their own credentials has an EWS transport
    per mailbox (threads, pooled connections); one unused for ``IDLE_TRANSPORT_SECONDS`` is closed
    rather than kept for the worker's life, and a later send builds a new one."""
    from services.dispatch import transports as transports_module

    registry, org = exchange.registry, exchange.org
    sender = await exchange.sender(kind)
    mailbox = await registry.mailbox(org, sender)

    async def send(subject: str) -> None:
        await _send_directly(transports, registry, mailbox.id, sender, subject)

    transports = Transports(timeout=10)
    try:
        await send("first")
        (first,) = transports._exchange.values()
        monkeypatch.setattr(transports_module, "IDLE_TRANSPORT_SECONDS", 0.0)   # idle for long enough
        await send("later")
        (later,) = transports._exchange.values()
        await asyncio.gather(*transports._closing)
        assert later.transport is not first.transport
        assert first.transport._closed if kind == "ews" else first.transport._client.is_closed
    finally:
        await transports.close()
    assert sorted(r.protocol for r in exchange.sim.sent) == [kind, kind]


async def test_a_rotated_ews_app_secret_is_used_at_once(registry: Registry, org: Organization, tmp_path) -> None:
    """App-only EWS (OAuth 2.0, so over TLS): the app's secret rotated in the directory and in the
    profile; the old secret no longer gets a token, and the next send uses the new one at once."""
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    async with ExchangeSimulator(domain="contoso.test", ssl_context=server_tls) as sim:
        sender = _address("sender")
        sim.add_mailbox(sender, password=PASSWORD, display_name="Sender")
        client_id = f"{APP_ID[:-6]}{uuid.uuid4().hex[:6]}"
        sim.add_app(client_id, APP_SECRET)
        profile = f"ews-app-{uuid.uuid4().hex[:6]}"
        await registry.add_profile(org, ProfileInput(
            name=profile, server_type="exchange_server", service_url=sim.ews_url, auth_method="oauth2",
            oauth_token_url=sim.token_url, oauth_client_id=client_id, oauth_client_secret=SecretStr(APP_SECRET),
            tls_ca_file=str(tmp_path / "ca.pem")))
        await registry.add_user(org, "Sender", sender)
        await registry.update_mailbox(org, sender, email_approved=True, profile=profile)
        mailbox = await registry.mailbox(org, sender)
        await registry.record_test(mailbox.id, "outgoing", True, "ok")

        async def send(subject: str) -> None:
            await _send_directly(transports, registry, mailbox.id, sender, subject)

        transports = Transports(timeout=10)
        try:
            await send("with the first secret")
            sim.add_app(client_id, APP_SECRET + "-rotated")   # the directory now knows only the new secret
            sim.expire_tokens()
            await registry.update_profile(org, profile, oauth_client_secret=SecretStr(APP_SECRET + "-rotated"))
            await send("with the rotated secret")
        finally:
            await transports.close()
        assert [r.protocol for r in sim.sent] == ["ews", "ews"]
