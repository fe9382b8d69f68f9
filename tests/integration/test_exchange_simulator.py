"""The Exchange simulator against real clients: exchangelib (EWS) and httpx (Graph, token endpoint).

exchangelib is synchronous, so its calls run in a worker thread while the simulator serves on the
test's event loop.  Each test gets its own simulator with its own mailboxes.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trustme
from exchangelib import (
    BASIC,
    DELEGATE,
    IMPERSONATION,
    UTC,
    Account,
    Configuration,
    Credentials,
    Message,
)
from exchangelib.errors import (
    ErrorAccessDenied,
    ErrorImpersonateUserDenied,
    ErrorSendAsDenied,
    ErrorServerBusy,
    ErrorTimeoutExpired,
    UnauthorizedError,
)
from exchangelib.protocol import CachingProtocol

from simulators.exchange import ExchangeSimulator
from simulators.exchange.store import DROP

PASSWORD = "correct horse"
APP_ID, APP_SECRET = "11111111-2222-3333-4444-555555555555", "app-secret-value"


def mime(n: int, *, sender: str = "alice@contoso.test", to: str = "bob@contoso.test", extra: str = "") -> bytes:
    return (f"From: Alice <{sender}>\r\nTo: {to}\r\n{extra}Subject: message {n}\r\n"
            f"Message-ID: <m{n}.sim@conduit.test>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nbody {n}\r\n").encode()


@pytest.fixture(autouse=True)
def no_simulator_crashes(caplog: pytest.LogCaptureFixture):
    """A handler exception in the simulator is a bug in it, even if the client copes."""
    yield
    crashes = [r for r in caplog.get_records("call") if r.name.startswith("aiohttp") and r.levelno >= logging.ERROR]
    assert not crashes, [r.getMessage() for r in crashes]


@pytest.fixture(autouse=True)
def fresh_exchangelib_cache():
    # exchangelib caches protocols per (endpoint, credentials) process-wide; ports are reused.
    CachingProtocol.clear_cache()
    yield
    CachingProtocol.clear_cache()


@pytest.fixture
async def sim() -> AsyncIterator[ExchangeSimulator]:
    async with ExchangeSimulator() as s:
        for name in ("alice", "bob", "carol"):
            s.add_mailbox(f"{name}@contoso.test", password=PASSWORD)
        s.add_app(APP_ID, APP_SECRET)
        yield s


def ews_account(sim: ExchangeSimulator, address: str = "alice@contoso.test", *, user: str | None = None,
                password: str = PASSWORD, access_type: str = DELEGATE, auth_type: str | None = BASIC) -> Account:
    config = Configuration(service_endpoint=sim.ews_url, credentials=Credentials(user or address, password),
                           auth_type=auth_type)
    return Account(address, config=config, autodiscover=False, access_type=access_type, default_timezone=UTC)


# ------------------------------------------------------------------------------------------- EWS


async def test_exchangelib_connects_sends_and_finds_the_message(sim: ExchangeSimulator) -> None:
    def scenario() -> tuple[list, list]:
        alice = ews_account(sim, auth_type=None)  # let exchangelib probe the auth scheme, as by default
        assert alice.version.build.major_version == 15
        Message(account=alice, folder=alice.sent, mime_content=mime(1, extra="Cc: carol@contoso.test\r\n"
                                                                               "Bcc: dave@elsewhere.test\r\n")
                ).send_and_save()
        sent = list(alice.sent.filter(message_id="<m1.sim@conduit.test>"))
        bob = ews_account(sim, "bob@contoso.test")
        inbox = list(bob.inbox.all().only("subject", "message_id", "mime_content", "author"))
        return sent, inbox

    sent, inbox = await asyncio.to_thread(scenario)
    assert [m.message_id for m in sent] == ["<m1.sim@conduit.test>"]
    assert [m.message_id for m in inbox] == ["<m1.sim@conduit.test>"]
    assert inbox[0].author.email_address == "alice@contoso.test"
    assert b"Bcc" not in inbox[0].mime_content and b"body 1" in inbox[0].mime_content
    assert [i.internet_message_id for i in sim.items("carol@contoso.test")] == ["<m1.sim@conduit.test>"]
    record = sim.sent[-1]
    assert record.delivered_to == ["bob@contoso.test", "carol@contoso.test"]
    assert record.external == ["dave@elsewhere.test"]  # accepted, as Exchange does (it would bounce later)
    assert b"Bcc: dave@elsewhere.test" in sim.items("alice@contoso.test", "sentitems")[0].mime
    assert sim.ews.requests[:2] == ["ConvertId", "GetFolder"]  # version probe, then the distinguished folders


async def test_sync_folder_items_reports_only_changes_since_the_state(sim: ExchangeSimulator) -> None:
    for n in range(3):
        sim.deliver("bob@contoso.test", mime(n, sender="x@elsewhere.test"))

    def sync(state: str | None) -> tuple[list, str]:
        bob = ews_account(sim, "bob@contoso.test")
        changes = list(bob.inbox.sync_items(sync_state=state, max_changes_returned=2))
        return changes, bob.inbox.item_sync_state

    first, state = await asyncio.to_thread(sync, None)
    assert sorted(c[0] for c in first) == ["create"] * 3
    inbox = sim.mailbox("bob@contoso.test").inbox
    gone = next(iter(inbox.items))
    sim.org.delete_item(inbox, gone)
    new = sim.deliver("bob@contoso.test", mime(9, sender="x@elsewhere.test"))
    second, _ = await asyncio.to_thread(sync, state)
    kinds = {(c[0], getattr(c[1], "id", None) or c[1][0]) for c in second}
    assert kinds == {("delete", gone), ("create", new.id)}


async def test_wrong_password_is_401(sim: ExchangeSimulator) -> None:
    with pytest.raises(UnauthorizedError):
        await asyncio.to_thread(lambda: ews_account(sim, password="wrong").inbox)


async def test_server_busy_carries_back_off(sim: ExchangeSimulator) -> None:
    account = ews_account(sim)
    await asyncio.to_thread(lambda: account.sent)
    sim.ews_server_busy(back_off=7.5, operation="CreateItem")
    with pytest.raises(ErrorServerBusy) as caught:
        await asyncio.to_thread(Message(account=account, folder=account.sent, mime_content=mime(2)).send_and_save)
    assert caught.value.back_off == 7.5
    assert not sim.sent


async def test_impersonation_needs_the_role(sim: ExchangeSimulator) -> None:
    sim.add_service_account("svc-crm", "svc-pw", impersonation=True)
    sim.add_service_account("svc-plain", "svc-pw")

    def send(user: str) -> None:
        a = ews_account(sim, "alice@contoso.test", user=user, password="svc-pw", access_type=IMPERSONATION)
        Message(account=a, folder=a.sent, mime_content=mime(3)).send_and_save()

    await asyncio.to_thread(send, "svc-crm")
    assert sim.sent[-1].mailbox == "alice@contoso.test"
    with pytest.raises(ErrorImpersonateUserDenied):
        await asyncio.to_thread(send, "svc-plain")


async def test_delegate_needs_full_access_and_send_as(sim: ExchangeSimulator) -> None:
    def open_and_send() -> None:
        a = ews_account(sim, "alice@contoso.test", user="bob@contoso.test")
        Message(account=a, folder=a.sent, mime_content=mime(4)).send_and_save()

    with pytest.raises(ErrorAccessDenied):
        await asyncio.to_thread(open_and_send)
    sim.grant_full_access("alice@contoso.test", "bob@contoso.test")
    CachingProtocol.clear_cache()
    with pytest.raises(ErrorSendAsDenied):
        await asyncio.to_thread(open_and_send)
    sim.grant_send_as("alice@contoso.test", "bob@contoso.test")
    await asyncio.to_thread(open_and_send)
    assert sim.sent[-1].message_id == "<m4.sim@conduit.test>"


# ----------------------------------------------------------------------------------------- Graph


async def token(client: httpx.AsyncClient, sim: ExchangeSimulator, secret: str = APP_SECRET) -> httpx.Response:
    return await client.post(sim.token_url, data={"grant_type": "client_credentials", "client_id": APP_ID,
                                                  "client_secret": secret,
                                                  "scope": "https://graph.microsoft.com/.default"})


async def test_token_endpoint_issues_and_refuses(sim: ExchangeSimulator) -> None:
    async with httpx.AsyncClient() as client:
        ok = await token(client, sim)
        assert ok.status_code == 200
        assert ok.json()["token_type"] == "Bearer" and ok.json()["expires_in"] == 3600
        bad = await token(client, sim, "nope")
        assert bad.status_code == 401 and bad.json()["error"] == "invalid_client"
        assert "AADSTS7000215" in bad.json()["error_description"]


async def test_graph_send_mail_json_and_mime(sim: ExchangeSimulator) -> None:
    async with httpx.AsyncClient(base_url=sim.graph_url) as client:
        bearer = {"Authorization": "Bearer " + (await token(client, sim)).json()["access_token"]}
        message = {"subject": "json", "body": {"contentType": "HTML", "content": "<p>hi</p>"},
                   "toRecipients": [{"emailAddress": {"address": "bob@contoso.test"}}],
                   "internetMessageHeaders": [{"name": "X-Conduit-Id", "value": "42"}],
                   "attachments": [{"@odata.type": "#microsoft.graph.fileAttachment", "name": "a.txt",
                                    "contentType": "text/plain",
                                    "contentBytes": base64.b64encode(b"attached").decode()}]}
        r = await client.post("/users/alice@contoso.test/sendMail", json={"message": message}, headers=bearer)
        assert r.status_code == 202
        r = await client.post("/users/alice@contoso.test/sendMail", content=base64.b64encode(mime(5)),
                              headers={**bearer, "Content-Type": "text/plain"})
        assert r.status_code == 202
        listed = (await client.get("/users/bob@contoso.test/mailFolders/inbox/messages", headers=bearer)).json()
        bad = await client.post("/users/alice@contoso.test/sendMail", headers=bearer, json={"message": {
            **message, "internetMessageHeaders": [{"name": "Subject", "value": "x"}]}})
    subjects = {m["subject"]: m for m in listed["value"]}
    assert set(subjects) == {"json", "message 5"}
    assert subjects["message 5"]["internetMessageId"] == "<m5.sim@conduit.test>"
    assert subjects["json"]["hasAttachments"] is True and subjects["json"]["body"]["contentType"] == "html"
    inbox_json = next(i for i in sim.items("bob@contoso.test") if i.subject == "json")
    assert ("X-Conduit-Id", "42") in inbox_json.headers and inbox_json.attachments[0].content == b"attached"
    assert len(sim.items("alice@contoso.test", "sentitems")) == 2
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "InvalidInternetMessageHeader"


async def test_graph_refuses_bad_tokens_and_throttles(sim: ExchangeSimulator) -> None:
    async with httpx.AsyncClient(base_url=sim.graph_url) as client:
        r = await client.post("/users/alice@contoso.test/sendMail", content=base64.b64encode(mime(6)),
                              headers={"Authorization": "Bearer made-up", "Content-Type": "text/plain"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "InvalidAuthenticationToken"
        bearer = {"Authorization": "Bearer " + (await token(client, sim)).json()["access_token"],
                  "Content-Type": "text/plain"}
        sim.graph_throttle(retry_after=12)
        r = await client.post("/users/alice@contoso.test/sendMail", content=base64.b64encode(mime(6)),
                              headers=bearer)
        assert r.status_code == 429 and r.headers["Retry-After"] == "12"
        sim.expire_tokens()
        r = await client.post("/users/alice@contoso.test/sendMail", content=base64.b64encode(mime(6)),
                              headers=bearer)
        assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    assert not sim.sent


async def test_a_dropped_connection_is_served_and_never_answered(sim: ExchangeSimulator) -> None:
    """``drop_connection``: the send is carried out (filed in Sent Items, delivered), then the connection
    is closed (FIN) or reset (RST) with no answer; the next call, on a new connection, is answered."""
    async with httpx.AsyncClient(base_url=sim.graph_url) as client:
        sim.drop_connection("token")
        with pytest.raises(httpx.RemoteProtocolError):
            await token(client, sim)
        assert len(sim.org.tokens) == 1  # issued, never received
        headers = {"Authorization": "Bearer " + (await token(client, sim)).json()["access_token"],
                   "Content-Type": "text/plain"}
        sim.drop_connection("graph", operation="sendMail")
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await client.post("/users/alice@contoso.test/sendMail", content=base64.b64encode(mime(10)),
                              headers=headers)
        sim.drop_connection("graph", operation="sendMail", reset=True)
        with pytest.raises(httpx.ReadError):
            await client.post("/users/alice@contoso.test/sendMail", content=base64.b64encode(mime(11)),
                              headers=headers)
        answered = await client.post("/users/alice@contoso.test/sendMail", content=base64.b64encode(mime(12)),
                                     headers=headers)
        assert answered.status_code == 202

    account = ews_account(sim)
    await asyncio.to_thread(lambda: account.sent)
    sim.drop_connection("ews", operation="CreateItem")
    with pytest.raises(ErrorTimeoutExpired, match="Connection aborted"):  # how exchangelib re-raises it
        await asyncio.to_thread(Message(account=account, folder=account.sent, mime_content=mime(13)).send_and_save)

    sent = [f"<m{n}.sim@conduit.test>" for n in (10, 11, 12, 13)]
    assert [r.message_id for r in sim.sent] == sent
    assert [i.internet_message_id for i in sim.items("alice@contoso.test", "sentitems")] == sent
    assert [i.internet_message_id for i in sim.items("bob@contoso.test")] == sent


async def test_gateway_pages_garbled_answers_and_oversized_payloads(sim: ExchangeSimulator) -> None:
    """``gateway_error``: a bare page with ``Connection: close`` (the call served or not, with
    ``Retry-After`` when asked); ``garble_answer``: served, answered with a body its gzip encoding does
    not match; and Graph's 413 for a sendMail payload over its limit."""
    account = ews_account(sim)
    await asyncio.to_thread(lambda: account.sent)
    sim.gateway_error("ews", 504, operation="CreateItem")
    with pytest.raises(ErrorServerBusy, match="closed connection"):  # how exchangelib labels it
        await asyncio.to_thread(Message(account=account, folder=account.sent, mime_content=mime(20)).send_and_save)
    async with httpx.AsyncClient(base_url=sim.graph_url) as client:
        headers = {"Authorization": "Bearer " + (await token(client, sim)).json()["access_token"],
                   "Content-Type": "text/plain"}
        sim.gateway_error("graph", 503, served=False, retry_after=30, operation="sendMail")
        page = await client.post("/users/alice@contoso.test/sendMail", content=base64.b64encode(mime(21)),
                                 headers=headers)
        assert (page.status_code, page.headers["Connection"], page.headers["Retry-After"]) == (503, "close", "30")
        sim.garble_answer("graph", operation="sendMail")
        with pytest.raises(httpx.DecodingError):
            await client.post("/users/alice@contoso.test/sendMail", content=base64.b64encode(mime(22)),
                              headers=headers)
        sim.graph.max_request_bytes = 100
        too_large = await client.post("/users/alice@contoso.test/sendMail", content=base64.b64encode(mime(23)),
                                      headers=headers)
        assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "RequestEntityTooLarge"
    assert [r.message_id for r in sim.sent] == ["<m20.sim@conduit.test>", "<m22.sim@conduit.test>"]


async def test_a_send_filed_late_shows_up_once_its_time_comes() -> None:
    """``file_sent_late``: the send is accepted and answered at once, as Graph answers ``sendMail`` 202
    before Exchange has sent; its Sent Items copy and the recipient's copy appear only once the delay
    has passed on the simulator's clock (a clock the test moves: no waiting), to whoever looks; the
    next send files at once.  EWS takes the same knob."""
    now = [1_800_000_000.0]
    async with ExchangeSimulator(clock=lambda: now[0]) as sim:
        for name in ("alice", "bob"):
            sim.add_mailbox(f"{name}@contoso.test", password=PASSWORD)
        sim.add_app(APP_ID, APP_SECRET)
        async with httpx.AsyncClient(base_url=sim.graph_url) as client:
            headers = {"Authorization": "Bearer " + (await token(client, sim)).json()["access_token"]}

            async def in_sent_items(n: int) -> bool:
                r = await client.get("/users/alice@contoso.test/mailFolders/sentitems/messages", headers=headers,
                                     params={"$filter": f"internetMessageId eq '<m{n}.sim@conduit.test>'"})
                assert r.status_code == 200
                return bool(r.json()["value"])

            sim.file_sent_late("graph", 2.0)
            r = await client.post("/users/alice@contoso.test/sendMail", content=base64.b64encode(mime(20)),
                                  headers={**headers, "Content-Type": "text/plain"})
            assert r.status_code == 202
            (record,) = sim.sent  # accepted at once...
            assert (record.filed_at, record.sent_item_id, record.delivered_to) == (None, None, [])
            assert not await in_sent_items(20) and sim.items("bob@contoso.test") == []
            now[0] += 1.9
            assert not await in_sent_items(20)
            now[0] += 0.1
            assert await in_sent_items(20)  # ...filed once its time came
            assert record.filed_at == now[0] and record.delivered_to == ["bob@contoso.test"]
            assert record.sent_item_id == sim.items("alice@contoso.test", "sentitems")[0].id
            assert [i.internet_message_id for i in sim.items("bob@contoso.test")] == ["<m20.sim@conduit.test>"]

            r = await client.post("/users/alice@contoso.test/sendMail", content=base64.b64encode(mime(21)),
                                  headers={**headers, "Content-Type": "text/plain"})
            assert r.status_code == 202 and await in_sent_items(21)  # times=1: the next one files at once

        account = ews_account(sim)
        sim.file_sent_late("ews", 5.0)
        # exchangelib blocks on the server (version probe, GetFolder): off the loop that serves it.
        await asyncio.to_thread(lambda: Message(account=account, folder=account.sent, mime_content=mime(22))
                                .send_and_save())

        def copies() -> list:
            return list(account.sent.filter(message_id="<m22.sim@conduit.test>").values_list("id", flat=True))

        assert await asyncio.to_thread(copies) == []
        now[0] += 5.0
        assert len(await asyncio.to_thread(copies)) == 1
    assert [r.filed_at - r.at for r in sim.sent] == [2.0, 0.0, 5.0]


async def test_graph_delta_pages_then_reports_changes(sim: ExchangeSimulator) -> None:
    for n in range(3):
        sim.deliver("bob@contoso.test", mime(n, sender="x@elsewhere.test"))
    async with httpx.AsyncClient() as client:
        headers = {"Authorization": "Bearer " + (await token(client, sim)).json()["access_token"],
                   "Prefer": "odata.maxpagesize=2"}
        url, seen = f"{sim.graph_url}/users/bob@contoso.test/mailFolders/inbox/messages/delta", []
        while True:
            page = (await client.get(url, headers=headers)).json()
            seen += [m["id"] for m in page["value"]]
            if "@odata.deltaLink" in page:
                delta_link = page["@odata.deltaLink"]
                break
            url = page["@odata.nextLink"]
        assert len(seen) == 3
        inbox = sim.mailbox("bob@contoso.test").inbox
        sim.org.delete_item(inbox, seen[0])
        new = sim.deliver("bob@contoso.test", mime(7, sender="x@elsewhere.test"))
        changes = (await client.get(delta_link, headers=headers)).json()["value"]
    assert {(c["id"], "@removed" in c) for c in changes} == {(seen[0], True), (new.id, False)}


# ------------------------------------------------------------------------------- HTTPS, control, CLI


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, str]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server)
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return server, str(path)


async def test_https_is_verified(tls: tuple[ssl.SSLContext, str]) -> None:
    server_ctx, ca_file = tls
    async with ExchangeSimulator(ssl_context=server_ctx) as sim:
        sim.add_app(APP_ID, APP_SECRET)
        assert sim.token_url.startswith("https://")
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca_file)) as client:
            assert (await token(client, sim)).status_code == 200
        async with httpx.AsyncClient() as untrusting:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await token(untrusting, sim)


async def test_control_api(sim: ExchangeSimulator) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as client:
        r = await client.post("/_sim/mailboxes", json={"address": "dora@contoso.test"})
        assert r.status_code == 201
        r = await client.post("/_sim/mailboxes/dora@contoso.test/deliver", content=mime(8, to="dora@contoso.test"))
        assert r.status_code == 201
        items = (await client.get("/_sim/mailboxes/dora@contoso.test/folders/inbox/items")).json()
        assert [i["internet_message_id"] for i in items] == ["<m8.sim@conduit.test>"]
        r = await client.post("/_sim/faults", json={"api": "graph", "status": 503, "code": "ServiceUnavailable",
                                                    "retry_after": 3})
        assert r.status_code == 201 and sim.faults.take("graph", "sendMail").retry_after == 3
        r = await client.post("/_sim/faults", json={"api": "ews", "status": DROP, "code": "Dropped", "reset": True})
        assert r.status_code == 201 and sim.faults.take("ews", "CreateItem").reset is True
        r = await client.post("/_sim/late-filings", json={"api": "graph", "seconds": 30})
        assert r.status_code == 201
        late = sim.org.submit("graph", sim.mailbox("dora@contoso.test"), mime(9, to="dora@contoso.test"))
        assert late.filed_at is None and (await client.get("/_sim/sent")).json()[-1]["filed_at"] is None


async def test_runs_as_a_module(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulators.exchange", "--port", "0", "--mailbox", "eve@contoso.test:pw",
        stdout=asyncio.subprocess.PIPE, cwd=str(Path(__file__).resolve().parents[2]))
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()  # type: ignore[union-attr]
        ews_url = line.split()[1]
        async with httpx.AsyncClient() as client:
            r = await client.post(ews_url, content=b"<x/>")
        assert r.status_code == 401 and "Basic" in r.headers["WWW-Authenticate"]
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 20) is not None
