"""The dispatch Exchange transports end to end against the Exchange simulator (EWS and Graph).

Checks what the dispatch service relies on: the message arrives with our Message-ID, a copy is in
the sender's Sent Items, and every failure comes back as the shared error taxonomy with the server's
code and back-off hint, never with a secret in it.
"""
from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator

import pytest
import trustme
from exchangelib.protocol import CachingProtocol

from services.dispatch.exchange_transport import (
    EwsOAuth,
    EwsTransport,
    ExchangePermanentError,
    ExchangeTransientError,
    GraphTransport,
)
from shared.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    InvalidInput,
    TlsFailed,
    TransientError,
)
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
    import asyncio

    ids = await asyncio.gather(*(ews.send("alice@contoso.test", mime(100 + n)) for n in range(12)))
    assert len(set(ids)) == 12
    assert len(sim.items("bob@contoso.test")) == 12


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
