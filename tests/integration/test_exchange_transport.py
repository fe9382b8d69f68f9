"""The dispatch Exchange transports end to end against the Exchange simulator (EWS and Graph).

Checks what the dispatch service relies on: the message arrives with our Message-ID, a copy is in
the sender's Sent Items, and every failure comes back as the shared error taxonomy with the server's
code and back-off hint, never with a secret in it.  A connection that fails once a send was written
says so (``request_sent``: the caller must not send again); one that fails before does not.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Iterator

import pytest
import trustme
from exchangelib.protocol import CachingProtocol

from services.dispatch.compose import check_size, compose
from services.dispatch.exchange_transport import (
    EwsOAuth,
    EwsTransport,
    ExchangePermanentError,
    ExchangeTransientError,
    GraphTransport,
)
from services.dispatch.service import GRAPH_MAX_MESSAGE_BYTES
from shared.errors import (
    AuthenticationFailed,
    ConduitError,
    ConnectionFailed,
    InvalidInput,
    ProtocolTimeout,
    TlsFailed,
    TransientError,
)
from shared.events.payloads import EmailOutboundV1
from shared.logs import configure_logging, keep_secrets_out
from shared.settings import Settings
from simulators.exchange import ExchangeSimulator, Fault

PASSWORD = "mailbox-password-123"
APP_ID, APP_SECRET = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "graph-secret-xyz"


def mime(n: int, *, sender: str = "alice@contoso.test", to: str = "bob@contoso.test", extra: str = "") -> bytes:
    return (f"From: Alice <{sender}>\r\nTo: {to}\r\n{extra}Subject: dispatch {n}\r\n"
            f"Message-ID: <d{n}.dispatch@conduit.test>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nbody {n}\r\n").encode()


@pytest.fixture(autouse=True)
def isolated_exchangelib_cache():
    CachingProtocol.clear_cache()
    yield
    # The transport must leave nothing in exchangelib's process-wide protocol cache.
    assert not CachingProtocol._protocol_cache
    CachingProtocol.clear_cache()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, str]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return server, str(path)


def populate(sim: ExchangeSimulator) -> ExchangeSimulator:
    for name in ("alice", "bob"):
        sim.add_mailbox(f"{name}@contoso.test", password=PASSWORD)
    sim.add_service_account("svc-crm", PASSWORD, impersonation=True)
    sim.add_app(APP_ID, APP_SECRET)
    return sim


@pytest.fixture
async def sim() -> AsyncIterator[ExchangeSimulator]:
    async with ExchangeSimulator() as s:
        yield populate(s)


@pytest.fixture
async def ews(sim: ExchangeSimulator) -> AsyncIterator[EwsTransport]:
    t = EwsTransport(service_url=sim.ews_url, credentials=("alice@contoso.test", PASSWORD), max_connections=4)
    yield t
    await t.close()


@pytest.fixture
async def graph(sim: ExchangeSimulator) -> AsyncIterator[GraphTransport]:
    t = GraphTransport(graph_url=sim.graph_url, token_url=sim.token_url, client_id=APP_ID, client_secret=APP_SECRET)
    yield t
    await t.close()


# ------------------------------------------------------------------------------------------- EWS


async def test_ews_send_keeps_message_id_and_files_sent_item(sim: ExchangeSimulator, ews: EwsTransport) -> None:
    await ews.check("alice@contoso.test")
    item_id = await ews.send("alice@contoso.test", mime(1, extra="Bcc: hidden@elsewhere.test\r\n"))
    sent = sim.items("alice@contoso.test", "sentitems")
    assert [i.id for i in sent] == [item_id]
    assert sent[0].internet_message_id == "<d1.dispatch@conduit.test>"
    inbox = sim.items("bob@contoso.test")
    assert [i.internet_message_id for i in inbox] == ["<d1.dispatch@conduit.test>"]
    assert b"hidden@elsewhere.test" not in inbox[0].mime
    assert sim.sent[0].external == ["hidden@elsewhere.test"]


async def test_ews_sends_concurrently_within_the_pool(sim: ExchangeSimulator, ews: EwsTransport) -> None:
    ids = await asyncio.gather(*(ews.send("alice@contoso.test", mime(100 + n)) for n in range(12)))
    assert len(set(ids)) == 12
    assert len(sim.items("bob@contoso.test")) == 12


async def test_ews_busy_answers_under_concurrency_never_hang_a_send(sim: ExchangeSimulator) -> None:
    """Many sends at once while Exchange answers half of them ErrorServerBusy: every send returns,
    with its message sent or with the busy answer and its back-off.  exchangelib shrinks its session
    pool on each busy answer under a lock it then takes again when no session is idle, which hung
    most of the sends (and the service's stop) for good."""
    t = EwsTransport(service_url=sim.ews_url, credentials=("alice@contoso.test", PASSWORD), max_connections=6)
    await t.check("alice@contoso.test")
    outcomes: list[str] = []
    for round_ in range(3):
        sim.ews_server_busy(back_off=0.01, operation="CreateItem", times=20)
        sends = [asyncio.create_task(t.send("alice@contoso.test", mime(1000 * (round_ + 1) + n))) for n in range(40)]
        _, hung = await asyncio.wait(sends, timeout=30)  # a deadline for a hang, not a pause
        assert not hung, f"round {round_}: {len(hung)} of 40 sends never returned"
        for send in sends:
            error = send.exception()
            assert error is None or isinstance(error, ExchangeTransientError) and error.code == "ErrorServerBusy", error
            outcomes.append("busy" if error else "sent")
    await t.close()
    assert outcomes.count("busy") == 60 and outcomes.count("sent") == 60
    assert len(sim.sent) == 60


async def test_ews_call_that_does_not_finish_is_given_up_as_a_lost_answer(sim: ExchangeSimulator) -> None:
    """A send whose call does not finish within the transport's bound comes back as a timeout that
    says the request may have gone (the caller looks in Sent Items); one still waiting for a worker
    thread says it was not sent, and is never started afterwards."""
    t = EwsTransport(service_url=sim.ews_url, credentials=("alice@contoso.test", PASSWORD), max_connections=1,
                     timeout=10, call_timeout=1.0)
    await t.check("alice@contoso.test")
    sim.answer_late("ews", 6.0, operation="CreateItem")  # served, answered after the bound
    started, queued = await asyncio.gather(t.send("alice@contoso.test", mime(70)),
                                           t.send("alice@contoso.test", mime(71)), return_exceptions=True)
    loop = asyncio.get_running_loop()
    closing = loop.time()
    await t.close()   # does not wait for the call given up on (its answer is 5 s away)
    assert loop.time() - closing < 3.0
    assert isinstance(started, ProtocolTimeout) and getattr(started, "request_sent", False) is True, started
    assert isinstance(queued, ProtocolTimeout) and getattr(queued, "request_sent", None) is False, queued
    assert "did not start" in str(queued) and queued.reason == "transport_busy"   # not the server's fault
    assert [r.message_id for r in sim.sent] == ["<d70.dispatch@conduit.test>"]


async def test_ews_timeout_before_createitem_sent_nothing(sim: ExchangeSimulator) -> None:
    """The first send of a mailbox opens its Sent Items (GetFolder) before CreateItem: a timeout
    there sent nothing, so it is a temporary failure to retry, not a lost answer to look up."""
    t = EwsTransport(service_url=sim.ews_url, credentials=("alice@contoso.test", PASSWORD), max_connections=2,
                     timeout=1.0)
    sim.answer_late("ews", 3.0, operation="GetFolder")
    try:
        with pytest.raises(ProtocolTimeout) as caught:
            await t.send("alice@contoso.test", mime(80))
        assert getattr(caught.value, "request_sent", None) is False, caught.value
        assert not sim.sent
        await t.send("alice@contoso.test", mime(81))   # retried: sent once
    finally:
        await t.close()
    assert [r.message_id for r in sim.sent] == ["<d81.dispatch@conduit.test>"]


@pytest.mark.parametrize("status", [502, 504])
async def test_ews_gateway_page_with_connection_close_is_a_lost_answer(
        sim: ExchangeSimulator, ews: EwsTransport, status: int) -> None:
    """Exchange sent the message, then a gateway answered its own 502/504 page with ``Connection:
    close``: the send says its request may have gone (looked for in Sent Items, not resent).
    exchangelib labels any answer with that header ErrorServerBusy, which read as "busy, nothing done"."""
    await ews.check("alice@contoso.test")
    sim.gateway_error("ews", status, operation="CreateItem")
    with pytest.raises(ExchangeTransientError) as caught:
        await ews.send("alice@contoso.test", mime(status))
    assert getattr(caught.value, "request_sent", False) is True, repr(caught.value)
    assert caught.value.code == f"HTTP{status}"
    assert [r.message_id for r in sim.sent] == [f"<d{status}.dispatch@conduit.test>"]
    assert await ews.find_sent("alice@contoso.test", f"<d{status}.dispatch@conduit.test>")


async def test_ews_gateway_page_is_a_lost_answer_with_app_tokens_too(tls: tuple[ssl.SSLContext, str]) -> None:
    """With app-only OAuth, exchangelib fetches a new token as it retires the session the page came
    on: the page, not that token's answer, decides."""
    server_ctx, ca_file = tls
    async with ExchangeSimulator(ssl_context=server_ctx) as sim:
        populate(sim)
        app = EwsTransport(service_url=sim.ews_url, ca_file=ca_file, credentials=EwsOAuth(
            client_id=APP_ID, client_secret=APP_SECRET, tenant_id=sim.org.tenant, token_url=sim.token_url))
        try:
            await app.check("bob@contoso.test")
            sim.gateway_error("ews", 504, operation="CreateItem")
            with pytest.raises(ExchangeTransientError) as caught:
                await app.send("bob@contoso.test", mime(98, sender="bob@contoso.test", to="alice@contoso.test"))
        finally:
            await app.close()
    assert getattr(caught.value, "request_sent", False) is True and caught.value.code == "HTTP504", repr(caught.value)
    assert [r.message_id for r in sim.sent] == ["<d98.dispatch@conduit.test>"]


async def test_ews_gateway_refusals_keep_their_meaning(sim: ExchangeSimulator, ews: EwsTransport) -> None:
    """A 503 or 429 with ``Retry-After`` is a refusal before any work: retried after that time (not
    exchangelib's default); a 401 is a refused login, ``Connection: close`` or not."""
    await ews.check("alice@contoso.test")
    for status in (503, 429):
        sim.gateway_error("ews", status, served=False, retry_after=120, operation="CreateItem")
        with pytest.raises(ExchangeTransientError) as refused:
            await ews.send("alice@contoso.test", mime(status))
        assert refused.value.retry_after == 120.0, refused.value
        assert getattr(refused.value, "request_sent", False) is False, refused.value
    # IIS while Exchange's application pool recycles: a bare 503, nothing done, to be resent.
    sim.gateway_error("ews", 503, served=False, operation="CreateItem")
    with pytest.raises(ExchangeTransientError) as recycling:
        await ews.send("alice@contoso.test", mime(5031))
    assert getattr(recycling.value, "request_sent", False) is False, recycling.value
    sim.gateway_error("ews", 401, served=False, operation="CreateItem")
    with pytest.raises(AuthenticationFailed):
        await ews.send("alice@contoso.test", mime(401))
    assert not sim.sent


async def test_ews_impersonation(sim: ExchangeSimulator) -> None:
    t = EwsTransport(service_url=sim.ews_url, credentials=("svc-crm", PASSWORD))
    try:
        await t.send("bob@contoso.test", mime(2, sender="bob@contoso.test", to="alice@contoso.test"),
                     impersonate=True)
    finally:
        await t.close()
    assert sim.sent[-1].mailbox == "bob@contoso.test"


async def test_ews_errors_are_mapped(sim: ExchangeSimulator, ews: EwsTransport) -> None:
    wrong = EwsTransport(service_url=sim.ews_url, credentials=("alice@contoso.test", "not-the-password"))
    with pytest.raises(AuthenticationFailed) as auth:
        await wrong.check("alice@contoso.test")
    assert "not-the-password" not in str(auth.value)
    await wrong.close()

    sim.ews_server_busy(back_off=4.0, operation="CreateItem")
    with pytest.raises(ExchangeTransientError) as busy:
        await ews.send("alice@contoso.test", mime(3))
    assert busy.value.retry_after == 4.0 and busy.value.code == "ErrorServerBusy"

    sim.inject("ews", Fault(200, "ErrorQuotaExceeded", "The mailbox quota is exceeded.", operation="CreateItem"))
    with pytest.raises(ExchangePermanentError) as quota:
        await ews.send("alice@contoso.test", mime(4))
    assert quota.value.code == "ErrorQuotaExceeded"

    with pytest.raises(ExchangePermanentError) as send_as:  # From names a mailbox alice may not send as
        await ews.send("alice@contoso.test", mime(5, sender="bob@contoso.test"))
    assert send_as.value.code == "ErrorSendAsDenied"

    with pytest.raises(ExchangePermanentError) as denied:  # delegate access without FullAccess
        await ews.send("bob@contoso.test", mime(6, sender="bob@contoso.test"))
    assert denied.value.code == "ErrorAccessDenied"

    with pytest.raises(InvalidInput):
        await ews.send("alice@contoso.test", b"Subject: no id\r\n\r\nx\r\n")
    assert not sim.sent


async def test_ews_keeps_accounts_only_for_the_mailboxes_sent_for_lately(sim: ExchangeSimulator, monkeypatch) -> None:
    """One impersonating transport sends for every mailbox of its profile: it keeps an exchangelib
    Account for the few it sent for last, not for each one it ever saw (thousands, for good)."""
    monkeypatch.setattr("services.dispatch.exchange_transport.ACCOUNTS_KEPT", 2)
    for name in ("carol", "dave"):
        sim.add_mailbox(f"{name}@contoso.test", password=PASSWORD)
    t = EwsTransport(service_url=sim.ews_url, credentials=("svc-crm", PASSWORD))
    try:
        for n, who in enumerate(("alice", "bob", "carol", "dave", "alice")):
            await t.send(f"{who}@contoso.test", mime(20 + n, sender=f"{who}@contoso.test"), impersonate=True)
        assert [address for address, _ in t._accounts] == ["dave@contoso.test", "alice@contoso.test"]
    finally:
        await t.close()
    assert [s.mailbox for s in sim.sent] == [f"{w}@contoso.test" for w in ("alice", "bob", "carol", "dave", "alice")]


async def test_ews_impersonation_denied_is_permanent(sim: ExchangeSimulator) -> None:
    sim.add_service_account("svc-plain", PASSWORD)
    t = EwsTransport(service_url=sim.ews_url, credentials=("svc-plain", PASSWORD))
    try:
        with pytest.raises(ExchangePermanentError) as denied:
            await t.send("alice@contoso.test", mime(7), impersonate=True)
    finally:
        await t.close()
    assert denied.value.code == "ErrorImpersonateUserDenied"


async def test_ews_unreachable_server_is_connection_failed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before use: nothing listens there
    t = EwsTransport(service_url=f"http://127.0.0.1:{port}/EWS/Exchange.asmx", credentials=("a@b.test", "pw"))
    try:
        with pytest.raises(ConnectionFailed):
            await t.check("a@b.test")
    finally:
        await t.close()


async def test_ews_https_verified_and_oauth(tls: tuple[ssl.SSLContext, str]) -> None:
    server_ctx, ca_file = tls
    async with ExchangeSimulator(ssl_context=server_ctx) as sim:
        populate(sim)
        untrusting = EwsTransport(service_url=sim.ews_url, credentials=("alice@contoso.test", PASSWORD))
        with pytest.raises(TlsFailed):
            await untrusting.check("alice@contoso.test")
        await untrusting.close()

        trusting = EwsTransport(service_url=sim.ews_url, credentials=("alice@contoso.test", PASSWORD),
                                ca_file=ca_file)
        await trusting.send("alice@contoso.test", mime(8))
        await trusting.close()

        oauth = EwsOAuth(client_id=APP_ID, client_secret=APP_SECRET, tenant_id=sim.org.tenant,
                         token_url=sim.token_url)
        assert APP_SECRET not in repr(oauth)
        app = EwsTransport(service_url=sim.ews_url, credentials=oauth, ca_file=ca_file)
        try:
            sent_id = await app.send("bob@contoso.test", mime(9, sender="bob@contoso.test", to="alice@contoso.test"))
        finally:
            await app.close()
    assert [r.message_id for r in sim.sent] == ["<d8.dispatch@conduit.test>", "<d9.dispatch@conduit.test>"]
    assert sent_id == sim.sent[-1].sent_item_id


async def test_ews_app_refused_for_one_mailbox_fails_that_mailbox_alone(tls: tuple[ssl.SSLContext, str]) -> None:
    """App-only EWS: a mailbox the app may not impersonate (outside its access policy, or no such
    mailbox), used first after a start, is refused with Exchange's own code, and every other mailbox
    of the profile still sends.  Before, the transport's version probe kept impersonating that first
    mailbox: every mailbox failed as "could not reach the EWS server" until a restart."""
    server_ctx, ca_file = tls
    async with ExchangeSimulator(ssl_context=server_ctx) as sim:
        populate(sim)
        sim.add_mailbox("carol@contoso.test")
        sim.add_app("scoped-app", "scoped-secret", mailboxes={"alice@contoso.test", "bob@contoso.test"})
        app = EwsTransport(service_url=sim.ews_url, ca_file=ca_file, credentials=EwsOAuth(
            client_id="scoped-app", client_secret="scoped-secret", tenant_id=sim.org.tenant, token_url=sim.token_url))
        try:
            with pytest.raises(ExchangePermanentError) as denied:
                await app.send("carol@contoso.test", mime(80, sender="carol@contoso.test"))
            with pytest.raises(ExchangePermanentError) as unknown:
                await app.check("nobody@contoso.test")
            await app.send("bob@contoso.test", mime(81, sender="bob@contoso.test", to="alice@contoso.test"))
            await app.send("alice@contoso.test", mime(82))
            with pytest.raises(ExchangePermanentError) as again:  # still refused, still alone
                await app.send("carol@contoso.test", mime(83, sender="carol@contoso.test"))
        finally:
            await app.close()
    assert denied.value.code == again.value.code == "ErrorImpersonateUserDenied", (denied.value, again.value)
    assert unknown.value.code == "ErrorNonExistentMailbox", unknown.value
    assert [r.message_id for r in sim.sent] == ["<d81.dispatch@conduit.test>", "<d82.dispatch@conduit.test>"]


# ----------------------------------------------------------------------------------------- Graph


async def test_graph_send_mime_and_token_cache(sim: ExchangeSimulator, graph: GraphTransport) -> None:
    await graph.check("alice@contoso.test")
    await graph.send("alice@contoso.test", mime(10))
    await graph.send("alice@contoso.test", mime(11))
    assert len(sim.org.tokens) == 1  # one token for all three calls
    assert [i.internet_message_id for i in sim.items("bob@contoso.test")] == [
        "<d10.dispatch@conduit.test>", "<d11.dispatch@conduit.test>"]
    assert len(sim.items("alice@contoso.test", "sentitems")) == 2

    sim.expire_tokens()  # the server stops honouring the cached token: one renewal, then success
    await graph.send("alice@contoso.test", mime(12))
    assert len(sim.org.tokens) == 2


async def test_graph_errors_are_mapped(sim: ExchangeSimulator, graph: GraphTransport) -> None:
    sim.graph_throttle(retry_after=7, operation="sendMail")
    with pytest.raises(ExchangeTransientError) as throttled:
        await graph.send("alice@contoso.test", mime(13))
    assert throttled.value.retry_after == 7.0 and throttled.value.code == "ApplicationThrottled"

    sim.graph_throttle(retry_after=2, status=503)
    with pytest.raises(TransientError) as unavailable:
        await graph.send("alice@contoso.test", mime(14))
    assert unavailable.value.retry_after == 2.0  # type: ignore[attr-defined]

    with pytest.raises(ExchangePermanentError) as unknown:
        await graph.send("nobody@contoso.test", mime(15))
    assert unknown.value.code == "ErrorInvalidUser"

    sim.add_mailbox("restricted@contoso.test")
    sim.add_app("scoped-app", "scoped-secret", mailboxes={"alice@contoso.test"})
    scoped = GraphTransport(graph_url=sim.graph_url, token_url=sim.token_url, client_id="scoped-app",
                            client_secret="scoped-secret")
    with pytest.raises(ExchangePermanentError) as policy:
        await scoped.send("restricted@contoso.test", mime(16, sender="restricted@contoso.test"))
    assert policy.value.code == "ErrorAccessDenied"
    await scoped.close()

    with pytest.raises(ExchangePermanentError) as no_rcpt:
        await graph.send("alice@contoso.test", mime(17, to="")[0:0] + b"From: alice@contoso.test\r\n"
                         b"Message-ID: <x@y>\r\nSubject: none\r\n\r\nbody\r\n")
    assert no_rcpt.value.code == "ErrorInvalidRecipients"
    assert not sim.sent


async def test_graph_sends_at_most_four_requests_at_once_to_a_mailbox(sim: ExchangeSimulator,
                                                                       graph: GraphTransport) -> None:
    """Graph takes 4 requests at once per app and mailbox (429 MailboxConcurrency beyond): a profile
    allowing 10 connections sends 10 messages from one mailbox without one refusal, while another
    mailbox's sends are not held back by them."""
    await graph.check("alice@contoso.test")
    sim.answer_late("graph", 0.3, operation="sendMail", times=12)   # so that they overlap
    await asyncio.gather(*(graph.send("alice@contoso.test", mime(200 + n)) for n in range(10)),
                         *(graph.send("bob@contoso.test", mime(300 + n, sender="bob@contoso.test",
                                                               to="alice@contoso.test")) for n in range(2)))
    assert sim.graph.over_concurrency == 0
    assert len(sim.sent) == 12 and not graph._mailboxes   # the gates of idle mailboxes are dropped


async def test_graph_413_is_a_message_too_large(sim: ExchangeSimulator, graph: GraphTransport) -> None:
    """Graph answers a sendMail payload over its limit with 413: a permanent refusal saying why, as the
    transport's own check says it."""
    sim.graph.max_request_bytes = 1000  # a limit below what the transport checks itself
    with pytest.raises(ExchangePermanentError) as caught:
        await graph.send("alice@contoso.test", mime(19, extra=f"X-Padding: {'x' * 2000}\r\n"))
    assert caught.value.reason == "message_too_large" and caught.value.code == "RequestEntityTooLarge", caught.value
    assert not sim.sent


@pytest.mark.parametrize("attachment_bytes", [2_200_000, 2_260_000, 2_280_000, 2_300_000])
async def test_a_message_accepted_for_graph_fits_graph(
        sim: ExchangeSimulator, graph: GraphTransport, attachment_bytes: int) -> None:
    """What intake accepts for a Graph mailbox (``check_size`` with ``GRAPH_MAX_MESSAGE_BYTES``) is
    sent by Graph: the estimate counts the line breaks MIME puts into base64.  Before, a 2.3 MB
    attachment was accepted, then refused at the send for its size."""
    content = bytes(range(256)) * (attachment_bytes // 256)
    request = EmailOutboundV1.model_validate({
        "idempotency_key": f"k{attachment_bytes}", "sender_email": "alice@contoso.test", "to": ["bob@contoso.test"],
        "subject": "sized", "text": "see the attachment", "attachments": [{
            "filename": "f.bin", "content_type": "application/octet-stream",
            "content_base64": base64.b64encode(content).decode()}]})
    try:
        check_size(request, GRAPH_MAX_MESSAGE_BYTES)
    except InvalidInput as refused:
        assert refused.reason == "too_large"
        return
    composed = compose(request, sender_email="alice@contoso.test", sender_name="Alice", subject="sized",
                       message_id=f"d{attachment_bytes}.dispatch@conduit.test", bcc_header=True)
    await graph.send("alice@contoso.test", composed.raw)
    assert [r.message_id for r in sim.sent] == [f"<d{attachment_bytes}.dispatch@conduit.test>"]


async def test_graph_bad_secret_is_authentication_failed(sim: ExchangeSimulator) -> None:
    t = GraphTransport(graph_url=sim.graph_url, token_url=sim.token_url, client_id=APP_ID,
                       client_secret="leaked-if-printed")
    try:
        with pytest.raises(AuthenticationFailed) as caught:
            await t.send("alice@contoso.test", mime(18))
    finally:
        await t.close()
    assert "invalid_client" in str(caught.value) and "leaked-if-printed" not in str(caught.value)


async def test_graph_tls_verified(tls: tuple[ssl.SSLContext, str]) -> None:
    server_ctx, ca_file = tls
    async with ExchangeSimulator(ssl_context=server_ctx) as sim:
        populate(sim)
        untrusting = GraphTransport(graph_url=sim.graph_url, token_url=sim.token_url, client_id=APP_ID,
                                    client_secret=APP_SECRET)
        with pytest.raises(TlsFailed):
            await untrusting.send("alice@contoso.test", mime(19))
        await untrusting.close()
        trusting = GraphTransport(graph_url=sim.graph_url, token_url=sim.token_url, client_id=APP_ID,
                                  client_secret=APP_SECRET, verify_tls=ca_file)
        await trusting.send("alice@contoso.test", mime(20))
        await trusting.close()
    assert sim.sent[-1].message_id == "<d20.dispatch@conduit.test>"


@pytest.mark.parametrize("status", [500, 502, 503, 504])  # 503 without Retry-After: not documented throttling
async def test_graph_5xx_after_the_send_is_found_in_sent_items(sim: ExchangeSimulator, status: int) -> None:
    """Exchange Online sent the message, then Graph (or a gateway in front of it) answered a 5xx that
    does not say the request was refused: Sent Items says it went out, so ``send`` succeeds, and a
    message that did not go out is an error to retry only after the window of look-ups."""
    graph = GraphTransport(graph_url=sim.graph_url, token_url=sim.token_url, client_id=APP_ID,
                           client_secret=APP_SECRET, sent_items_window=0.6)
    try:
        sim.fail_after_serving("graph", status, code="UnknownError", operation="sendMail")
        await graph.send("alice@contoso.test", mime(60))  # no error: it was sent
        assert [r.message_id for r in sim.sent] == ["<d60.dispatch@conduit.test>"]
        assert sim.graph.requests.count("messages") == 1

        sim.inject("graph", Fault(status, "UnknownError", "Not served.", operation="sendMail"))
        with pytest.raises(ExchangeTransientError) as not_sent:
            await graph.send("alice@contoso.test", mime(61))
        assert "not in the mailbox's Sent Items" in str(not_sent.value) and not_sent.value.code == "UnknownError"
        assert getattr(not_sent.value, "request_sent", False) is False  # safe to send again
        assert sim.graph.requests.count("messages") == 1 + 3  # at 0, 0.5 and 0.6 s
        assert len(sim.sent) == 1
    finally:
        await graph.close()


async def test_graph_throttling_is_retried_without_a_look_in_sent_items(
        sim: ExchangeSimulator, graph: GraphTransport) -> None:
    """429, and 503 with a Retry-After, are Graph's documented "throttled, not processed": a plain
    temporary failure, no look-up."""
    for status in (429, 503):
        sim.graph_throttle(retry_after=1, status=status, operation="sendMail")
        with pytest.raises(ExchangeTransientError) as throttled:
            await graph.send("alice@contoso.test", mime(62))
        assert throttled.value.retry_after == 1.0 and "Sent Items" not in str(throttled.value)
    assert sim.graph.requests.count("messages") == 0 and not sim.sent


async def test_graph_5xx_whose_look_up_fails_is_left_to_the_caller(sim: ExchangeSimulator) -> None:
    """A 504 whose Sent Items look-ups fail too: nothing says the message did not go, so the error says
    the request was sent (the caller looks again and never resends)."""
    graph = GraphTransport(graph_url=sim.graph_url, token_url=sim.token_url, client_id=APP_ID,
                           client_secret=APP_SECRET, sent_items_window=0)
    try:
        sim.fail_after_serving("graph", 504, operation="sendMail")
        sim.inject("graph", Fault(500, "UnknownError", operation="messages"))
        with pytest.raises(ExchangeTransientError) as caught:
            await graph.send("alice@contoso.test", mime(63))
    finally:
        await graph.close()
    assert getattr(caught.value, "request_sent", False) is True and "504" in str(caught.value)
    assert len(sim.sent) == 1


# ------------------------------------------------------------------------- connections that fail


@contextlib.asynccontextmanager
async def refusing(sim: ExchangeSimulator) -> AsyncIterator[None]:
    """Stop the simulator and hold its port without listening: every new connection to it is refused."""
    await sim.stop()
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind((sim.host, sim.port))
        yield


async def several_ews_sessions(sim: ExchangeSimulator, ews: EwsTransport, n: int = 4) -> None:
    """Let ``n`` look-ups overlap (the simulator holds their answers), so exchangelib opens ``n`` sessions,
    as it does under load: with more than one, it re-raises a failed HTTP exchange as ErrorServerBusy."""
    sim.answer_late("ews", 0.5, operation="FindItem", times=n)
    await asyncio.gather(*(ews.find_sent("alice@contoso.test", f"<none{i}@conduit.test>") for i in range(n)))
    assert ews._protocol.session_pool_size > 1  # the condition this helper exists for


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
async def test_ews_connection_dropped_after_the_send_is_outcome_unknown(
        sim: ExchangeSimulator, ews: EwsTransport, reset: bool) -> None:
    """Exchange sent the message, then the connection died before the answer (closed, or reset): the
    error says the request was sent, with one exchangelib session (ErrorTimeoutExpired underneath) as
    with several (ErrorServerBusy underneath)."""
    await ews.check("alice@contoso.test")
    sim.drop_connection("ews", operation="CreateItem", reset=reset)
    with pytest.raises(TransientError) as one_session:
        await ews.send("alice@contoso.test", mime(30))
    await several_ews_sessions(sim, ews)
    sim.drop_connection("ews", operation="CreateItem", reset=reset)
    with pytest.raises(TransientError) as several_sessions:
        await ews.send("alice@contoso.test", mime(31))

    errors = [one_session.value, several_sessions.value]
    assert [getattr(e, "request_sent", False) for e in errors] == [True, True], errors
    assert all(isinstance(e, ConnectionFailed) and "dropped" in str(e) for e in errors), errors
    sent = ["<d30.dispatch@conduit.test>", "<d31.dispatch@conduit.test>"]
    assert [r.message_id for r in sim.sent] == sent
    assert [i.internet_message_id for i in sim.items("alice@contoso.test", "sentitems")] == sent
    assert await ews.find_sent("alice@contoso.test", sent[1])  # how the caller resolves it
    await ews.send("alice@contoso.test", mime(32))  # the transport recovers on a new connection
    assert len(sim.sent) == 3


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
async def test_graph_connection_dropped_after_the_send_is_outcome_unknown(
        sim: ExchangeSimulator, graph: GraphTransport, reset: bool) -> None:
    sim.drop_connection("graph", operation="sendMail", reset=reset)
    with pytest.raises(TransientError) as caught:
        await graph.send("alice@contoso.test", mime(40))
    assert getattr(caught.value, "request_sent", False) is True, repr(caught.value)
    assert isinstance(caught.value, ConnectionFailed) and "dropped" in str(caught.value)
    assert [r.message_id for r in sim.sent] == ["<d40.dispatch@conduit.test>"]
    assert await graph.find_sent("alice@contoso.test", "<d40.dispatch@conduit.test>")

    # A look-up dropped the same way changed nothing: it is a plain temporary failure.
    sim.drop_connection("graph", operation="messages", reset=reset)
    with pytest.raises(ConnectionFailed) as lookup:
        await graph.find_sent("alice@contoso.test", "<d40.dispatch@conduit.test>")
    assert getattr(lookup.value, "request_sent", False) is False
    await graph.send("alice@contoso.test", mime(41))  # the transport recovers on a new connection
    assert len(sim.sent) == 2


async def test_ews_refused_connection_is_temporary_not_unknown(sim: ExchangeSimulator, ews: EwsTransport) -> None:
    """Nothing was written: the send is retried later, not looked for in Sent Items."""
    await ews.check("alice@contoso.test")  # logged in: what is left to fail is the send itself
    async with refusing(sim):
        with pytest.raises(TransientError) as caught:
            await ews.send("alice@contoso.test", mime(50))
    assert getattr(caught.value, "request_sent", False) is False, repr(caught.value)
    assert isinstance(caught.value, ConnectionFailed) and "could not reach" in str(caught.value)
    assert not sim.sent


async def test_graph_refused_connection_is_temporary_not_unknown(sim: ExchangeSimulator) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        t = GraphTransport(graph_url=f"http://127.0.0.1:{held.getsockname()[1]}/v1.0", token_url=sim.token_url,
                           client_id=APP_ID, client_secret=APP_SECRET)
        try:
            with pytest.raises(TransientError) as caught:
                await t.send("alice@contoso.test", mime(51))
        finally:
            await t.close()
    assert len(sim.org.tokens) == 1  # the token came: what was refused is the send itself
    assert getattr(caught.value, "request_sent", False) is False, repr(caught.value)
    assert isinstance(caught.value, ConnectionFailed) and "could not reach" in str(caught.value)
    assert not sim.sent


@pytest.fixture(params=["service", "cli"])
def service_log(request: pytest.FixtureRequest) -> Iterator[io.StringIO]:
    """The services' own logging set-up (``configure_logging``), or the CLI's (its handler, then
    ``keep_secrets_out``: Test & Enable runs the transports in the CLI), writing into a buffer;
    undone afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    libraries = {name: logging.getLogger(name).level for name in ("exchangelib", "requests_oauthlib", "oauthlib")}
    written = io.StringIO()
    if request.param == "service":
        configure_logging(Settings(), "dispatch")
        for handler in root.handlers:
            handler.setStream(written)  # type: ignore[attr-defined]
    else:
        root.handlers[:] = [logging.StreamHandler(written)]
        root.setLevel(logging.WARNING)
        keep_secrets_out()
    yield written
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, was in libraries.items():
        logging.getLogger(name).setLevel(was)


async def test_a_failed_ews_request_logs_neither_the_token_nor_the_message(
        tls: tuple[ssl.SSLContext, str], service_log: io.StringIO) -> None:
    """exchangelib logs a request that failed in a way it did not expect (here an answer whose gzip
    body is broken) at ERROR with its headers (the bearer token) and its SOAP body (the message's
    MIME); the services' logging drops those records: the transport reports the failure itself."""
    server_ctx, ca_file = tls
    async with ExchangeSimulator(ssl_context=server_ctx) as sim:
        populate(sim)
        app = EwsTransport(service_url=sim.ews_url, ca_file=ca_file, credentials=EwsOAuth(
            client_id=APP_ID, client_secret=APP_SECRET, tenant_id=sim.org.tenant, token_url=sim.token_url))
        sim.garble_answer("ews", operation="CreateItem")
        try:
            with pytest.raises(ConnectionFailed) as caught:
                await app.send("bob@contoso.test", mime(90, sender="bob@contoso.test", to="alice@contoso.test",
                                                        extra="X-Secret-Content: body-marker-4711\r\n"))
        finally:
            await app.close()
        tokens = list(sim.org.tokens)
    logged = service_log.getvalue()
    assert getattr(caught.value, "request_sent", False) is True  # the failure itself still reaches the caller
    assert tokens and not any(token in logged for token in tokens), logged
    marker = base64.b64encode(mime(90, sender="bob@contoso.test", to="alice@contoso.test",
                                   extra="X-Secret-Content: body-marker-4711\r\n")).decode()[:40]
    assert "MimeContent" not in logged and marker not in logged and "Bearer" not in logged, logged


@pytest.mark.parametrize(("status", "code"), [(429, "temporarily_unavailable"), (503, "temporarily_unavailable"),
                                            (500, "server_error")])
async def test_an_unavailable_token_endpoint_is_temporary_for_ews_as_for_graph(
        tls: tuple[ssl.SSLContext, str], status: int, code: str) -> None:
    """The identity platform throttling or down is no refused login: EWS and Graph both make it a
    temporary failure retried after its ``Retry-After``, not an authentication failure (which would
    alert every mailbox of the profile and tell Test & Enable the credentials are wrong)."""
    server_ctx, ca_file = tls
    async with ExchangeSimulator(ssl_context=server_ctx) as sim:
        populate(sim)
        sim.inject("token", Fault(status, code, "AADSTS90033: A transient error has occurred.", retry_after=60,
                                  times=2))  # the EWS and the Graph token request
        ews = EwsTransport(service_url=sim.ews_url, ca_file=ca_file, credentials=EwsOAuth(
            client_id=APP_ID, client_secret=APP_SECRET, tenant_id=sim.org.tenant, token_url=sim.token_url))
        graph = GraphTransport(graph_url=sim.graph_url, token_url=sim.token_url, client_id=APP_ID,
                               client_secret=APP_SECRET, verify_tls=ca_file)
        try:
            with pytest.raises(ConduitError) as by_ews:
                await ews.send("bob@contoso.test", mime(95, sender="bob@contoso.test", to="alice@contoso.test"))
            with pytest.raises(ConduitError) as by_graph:
                await graph.send("bob@contoso.test", mime(96, sender="bob@contoso.test", to="alice@contoso.test"))
            await ews.send("bob@contoso.test", mime(97, sender="bob@contoso.test", to="alice@contoso.test"))
        finally:
            await ews.close()
            await graph.close()
    for caught in (by_ews.value, by_graph.value):
        assert isinstance(caught, ExchangeTransientError), repr(caught)
        assert caught.retry_after == 60.0 and caught.code == code and caught.reason == "throttled", repr(caught)
        assert getattr(caught, "request_sent", False) is False
    assert [r.message_id for r in sim.sent] == ["<d97.dispatch@conduit.test>"]  # the next attempt goes


async def test_a_token_endpoint_echoing_the_secret_does_not_put_it_in_errors(tls: tuple[ssl.SSLContext, str]) -> None:
    # Azure AD never repeats the secret, but a gateway or another identity provider may echo the form
    # it was sent; the error's text goes into email.status, the ledger and the logs.
    server_ctx, ca_file = tls
    echoed = f"client_secret {APP_SECRET!r} is not valid for client {APP_ID}"
    async with ExchangeSimulator(ssl_context=server_ctx) as sim:
        populate(sim)
        sim.faults.add("token", Fault(400, "invalid_request", message=echoed, times=2))
        graph = GraphTransport(graph_url=sim.graph_url, token_url=sim.token_url, client_id=APP_ID,
                               client_secret=APP_SECRET, verify_tls=ca_file)
        ews = EwsTransport(service_url=sim.ews_url, ca_file=ca_file, credentials=EwsOAuth(
            client_id=APP_ID, client_secret=APP_SECRET, tenant_id=sim.org.tenant, token_url=sim.token_url))
        try:
            with pytest.raises(ExchangePermanentError) as by_graph:
                await graph.send("alice@contoso.test", mime(30))
            with pytest.raises(AuthenticationFailed) as by_ews:
                await ews.check("alice@contoso.test")
        finally:
            await graph.close()
            await ews.close()
    for caught in (by_graph, by_ews):
        assert APP_SECRET not in str(caught.value), caught.value
    assert "invalid_request" in str(by_graph.value) and "[redacted]" in str(by_graph.value)
