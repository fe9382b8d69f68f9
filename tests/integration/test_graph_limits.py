"""The Graph transport's bounds against the Exchange simulator: a send's time, and a mailbox's uploads.

A Graph send is bounded as a whole (token, request, reading the answer): a server that trickles its
answer cannot hold it for ever, and what the bound means depends on how far the send got (the
request written: a lost answer, looked for in Sent Items; not written: nothing sent, retried).
Graph allows an app 150 MB of uploads per mailbox in 5 minutes: the transport keeps that budget
itself, so a burst waits for its turn instead of being refused with 429, and the simulator refuses
what goes over it as Graph does.  The budgets here are made small (a megabyte in seconds) so that
the waits show in a test's time.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest

from services.dispatch.exchange_transport import (
    GRAPH_MAX_REQUEST_BYTES,
    ExchangePermanentError,
    ExchangeTransientError,
    GraphTransport,
)
from shared.errors import ProtocolTimeout
from simulators.exchange import ExchangeSimulator
from tests.integration.test_exchange_transport import APP_ID, APP_SECRET, mime, populate
from tests.support.waiting import eventually

ALICE, BOB = "alice@contoso.test", "bob@contoso.test"
BODY_BYTES = 480_000   # a sendMail body (base64 MIME) of about this size; two fit in 1 MB, three do not


def sized(n: int, *, sender: str = ALICE, to: str = BOB, body_bytes: int = BODY_BYTES) -> bytes:
    """Message ``n`` whose sendMail body (its base64) is ``body_bytes`` long, give or take a few bytes."""
    head = mime(n, sender=sender, to=to)
    missing = body_bytes * 3 // 4 - len(head)
    return head + (b"x" * 76 + b"\r\n") * (missing // 78) + b"y" * (missing % 78)


@pytest.fixture
async def sim() -> AsyncIterator[ExchangeSimulator]:
    async with ExchangeSimulator() as s:
        yield populate(s)


def transport(sim: ExchangeSimulator, **kwargs: object) -> GraphTransport:
    return GraphTransport(graph_url=sim.graph_url, token_url=sim.token_url, client_id=APP_ID,
                          client_secret=APP_SECRET, **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- time bound


async def test_an_answer_trickled_past_the_bound_is_a_lost_answer_not_a_hang(sim: ExchangeSimulator) -> None:
    """Graph took the sendMail, then writes its 202 a byte every 0.2 s: every read gets a byte, so
    httpx's per-read timeout (30 s) never trips.  The send ends at the transport's bound, as a lost
    answer (the caller looks in Sent Items and never resends), not hung for as long as the server
    likes."""
    graph = transport(sim, call_timeout=1.0)
    try:
        await graph.check(ALICE)   # the token is cached: what trickles is the send's own answer
        sim.trickle_answer("graph", 0.2, operation="sendMail")
        started = time.monotonic()
        with pytest.raises(ProtocolTimeout) as caught:
            await asyncio.wait_for(graph.send(ALICE, mime(1)), 20)   # a deadline for a hang, not a pause
        took = time.monotonic() - started
        assert getattr(caught.value, "request_sent", None) is True, repr(caught.value)
        assert getattr(caught.value, "after_write", None) is True and caught.value.reason == "timeout"
        assert 1.0 <= took < 3.0, took
        assert [r.message_id for r in sim.sent] == ["<d1.dispatch@conduit.test>"]   # it was sent: look, never resend
        assert await graph.find_sent(ALICE, "<d1.dispatch@conduit.test>")
    finally:
        await graph.close()


async def test_a_token_endpoint_that_stalls_sends_nothing_and_is_retryable(sim: ExchangeSimulator) -> None:
    """The token endpoint trickles its answer: the bound ends the send before any sendMail was
    written, so nothing was sent and the send is a plain temporary failure (retried, not looked up);
    the retry sends the message once."""
    graph = transport(sim, call_timeout=1.0)
    try:
        sim.trickle_answer("token", 0.2)
        started = time.monotonic()
        with pytest.raises(ProtocolTimeout) as caught:
            await asyncio.wait_for(graph.send(ALICE, mime(2)), 20)   # a deadline for a hang, not a pause
        assert time.monotonic() - started < 3.0
        assert getattr(caught.value, "request_sent", None) is False, repr(caught.value)
        assert getattr(caught.value, "after_write", None) is False and "token endpoint" in str(caught.value)
        assert "sendMail" not in sim.graph.requests and not sim.sent
        await graph.send(ALICE, mime(2))   # the retry
    finally:
        await graph.close()
    assert [r.message_id for r in sim.sent] == ["<d2.dispatch@conduit.test>"]


async def test_a_send_that_never_got_a_connection_is_transport_busy(sim: ExchangeSimulator) -> None:
    """The transport's only connection is held by a look-up whose answer trickles: a send waiting in
    vain for a connection of the transport's own is Conduit's congestion (``transport_busy``: no
    back-off of the mailbox), not sent; before, it read as the server unreachable."""
    graph = transport(sim, max_connections=1, timeout=0.5, call_timeout=10.0)
    try:
        await graph.check(ALICE)
        sim.trickle_answer("graph", 0.2, operation="messages")
        holding = asyncio.create_task(graph.find_sent(BOB, "<none@conduit.test>"))
        await eventually(lambda: _served(sim, "messages", 2), what="the look-up being answered")
        with pytest.raises(ProtocolTimeout) as caught:
            await graph.send(ALICE, mime(3))
        holding.cancel()
        await asyncio.gather(holding, return_exceptions=True)
    finally:
        await graph.close()
    assert caught.value.reason == "transport_busy", repr(caught.value)
    assert getattr(caught.value, "request_sent", None) is False and getattr(caught.value, "after_write") is False
    assert "sendMail" not in sim.graph.requests and not sim.sent


async def _served(sim: ExchangeSimulator, action: str, count: int) -> bool:
    return sim.graph.requests.count(action) >= count


# ---------------------------------------------------------------------------------- upload budget


async def test_a_burst_over_the_upload_budget_waits_for_its_turn(sim: ExchangeSimulator) -> None:
    """1 MB per 2 s, here and in the simulator: six messages of about 0.5 MB from one mailbox go two
    at a time, about 2 s apart, and none is refused; another mailbox's send, and the first mailbox's
    Sent Items look-ups, are not held back by the wait (it holds none of the mailbox's 4 places)."""
    sim.graph.upload_budget, sim.graph.upload_window = 1_000_000, 2.0
    graph = transport(sim, upload_budget=1_000_000, upload_window=2.0)
    messages = [sized(10 + n) for n in range(6)]
    assert all(abs(len(m) * 4 / 3 - BODY_BYTES) < 10 for m in messages)
    try:
        await graph.check(ALICE)
        started = time.monotonic()
        ended: dict[str, float] = {}

        async def send(address: str, message: bytes, name: str) -> None:
            await graph.send(address, message)
            ended[name] = time.monotonic() - started

        burst = [asyncio.create_task(send(ALICE, m, f"alice{n}")) for n, m in enumerate(messages)]
        await eventually(lambda: _served(sim, "sendMail", 2), what="the first two sends")
        await send(BOB, sized(20, sender=BOB, to=ALICE), "bob")
        looked = time.monotonic()
        assert not await graph.find_sent(ALICE, "<none@conduit.test>")
        looked = time.monotonic() - looked
        await asyncio.gather(*burst)
    finally:
        await graph.close()
    assert sim.graph.over_upload_budget == 0 and sim.graph.over_concurrency == 0
    assert len(sim.sent) == 7
    alice = sorted(ended[f"alice{n}"] for n in range(6))
    # Two per window: the third pair cannot start before the first pair's 2 s and the second's have passed.
    assert alice[1] < 1.5 and alice[3] >= 2.0 and alice[5] >= 4.0, alice
    assert ended["bob"] < 1.5 and looked < 1.0, (ended["bob"], looked)


async def test_a_message_larger_than_the_budget_goes_alone_and_is_not_held_for_ever(sim: ExchangeSimulator) -> None:
    """A budget smaller than one message (only a test's can be: Graph's 150 MB is far above its 4 MB
    per request) lets that message go once the window is empty; one over 4 MB is refused at once as
    too large, without waiting for anything."""
    graph = transport(sim, upload_budget=300_000, upload_window=1.0)
    try:
        started = time.monotonic()
        await graph.send(ALICE, sized(30))                  # over the budget, the window empty: at once
        first = time.monotonic() - started
        await graph.send(ALICE, sized(31))                  # waits until the first has left the window
        second = time.monotonic() - started
        with pytest.raises(ExchangePermanentError) as too_large:
            await graph.send(ALICE, sized(32, body_bytes=GRAPH_MAX_REQUEST_BYTES + 1000))
        third = time.monotonic() - started - second
    finally:
        await graph.close()
    assert first < 0.8 and second >= 1.0 and third < 0.5, (first, second, third)
    assert too_large.value.reason == "message_too_large"
    assert len(sim.sent) == 2


async def test_a_send_that_would_wait_too_long_fails_unsent_with_its_wait(sim: ExchangeSimulator) -> None:
    """A send that finds no room within ``upload_wait_limit`` is not sent: a temporary failure with the
    time the room comes in ``retry_after`` (dispatch retries it then), not a 429 from Graph."""
    graph = transport(sim, upload_budget=1_000_000, upload_window=30.0, upload_wait_limit=0.5)
    try:
        await graph.send(ALICE, sized(40))
        await graph.send(ALICE, sized(41))
        with pytest.raises(ExchangeTransientError) as caught:
            await graph.send(ALICE, sized(42))
        await graph.send(BOB, sized(43, sender=BOB, to=ALICE))   # another mailbox's budget is its own
    finally:
        await graph.close()
    assert caught.value.reason == "upload_budget" and 25.0 < (caught.value.retry_after or 0) <= 30.0, repr(caught.value)
    assert getattr(caught.value, "request_sent", False) is False
    assert sim.graph.requests.count("sendMail") == 3 and len(sim.sent) == 3


async def test_the_windows_of_idle_mailboxes_are_forgotten(sim: ExchangeSimulator) -> None:
    """A mailbox that sent nothing for a window is forgotten: the transport remembers only mailboxes
    that uploaded within the window (or are sending now)."""
    graph = transport(sim, upload_window=0.3)
    n = itertools.count(50)
    try:
        await graph.send(ALICE, mime(next(n)))
        assert ALICE in graph._uploads

        async def alice_forgotten() -> bool:
            await graph.send(BOB, mime(next(n), sender=BOB, to=ALICE))
            return ALICE not in graph._uploads

        await eventually(alice_forgotten, timeout=5, interval=0.1, what="alice's window to be forgotten")
    finally:
        await graph.close()


async def test_the_simulator_refuses_uploads_over_the_budget(sim: ExchangeSimulator) -> None:
    """With the transport's own budget at Graph's 150 MB, the simulator's 1 MB per minute refuses the
    third 0.5 MB message as Graph does: 429 ApplicationThrottled with a Retry-After, counted, nothing
    sent; another mailbox and another app have budgets of their own."""
    sim.graph.upload_budget, sim.graph.upload_window = 1_000_000, 60.0
    sim.add_app("other-app", "other-secret")
    graph = transport(sim)
    other = GraphTransport(graph_url=sim.graph_url, token_url=sim.token_url, client_id="other-app",
                           client_secret="other-secret")
    try:
        await graph.send(ALICE, sized(60))
        await graph.send(ALICE, sized(61))
        with pytest.raises(ExchangeTransientError) as refused:
            await graph.send(ALICE, sized(62))
        await graph.send(BOB, sized(63, sender=BOB, to=ALICE))
        await other.send(ALICE, sized(64))
    finally:
        await graph.close()
        await other.close()
    assert refused.value.code == "ApplicationThrottled" and refused.value.reason == "throttled", repr(refused.value)
    assert "IncomingBytes" in str(refused.value) and 55.0 <= (refused.value.retry_after or 0) <= 60.0
    assert sim.graph.over_upload_budget == 1
    assert [r.message_id for r in sim.sent] == [f"<d{n}.dispatch@conduit.test>" for n in (60, 61, 63, 64)]
