"""XOAUTH2 for real: Conduit gets an OAuth 2.0 token and signs in to a Dovecot that checks it.

`AuthorizationServer` (aiohttp, below) is a small OAuth 2.0 authorization server on loopback: it
issues client-credentials tokens (RFC 6749 section 4.4) to Conduit's `TokenProvider`, and answers
token introspection (RFC 7662) for Dovecot's `oauth2` passdb (`conduit.peers.dovecot.OAuth2Passdb`),
which authenticates with HTTP Basic credentials of its own, as a resource server does. An active
token's `username` is the mailbox its client was granted; Dovecot lets a login in only when the
token is active and that name is the login's user.  Expiry is decided by the server's clock, so a
test expires a token by telling the server, not by waiting.

Dovecot serves IMAP and POP3 with TLS here: tokens travel as they would in production.
"""
from __future__ import annotations

import base64
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest
from aiohttp import web
from pydantic import SecretStr

from conduit.peers.dovecot import Dovecot, OAuth2Passdb
from conduit.peers.ports import LOOPBACK
from services.ingest.imap_client import ImapClient
from services.ingest.pop3_client import Pop3Client
from services.ingest.service import IngestService
from shared.errors import AuthenticationFailed, ConnectionFailed, TransientError
from shared.lifecycle import run_service
from shared.oauth import TokenProvider
from shared.registry.service import ProfileInput, Registry
from shared.settings import Settings
from tests.support.mailboxes import imap_profile, message, pop3_profile, ready_mailbox
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers

SCOPE = "https://outlook.office365.com/.default"


# -- the authorization server ----------------------------------------------------------------------


@dataclass
class OAuthClient:
    """A registered confidential client; its tokens act for `mailbox` (None: for no mailbox)."""

    client_id: str
    secret: str
    mailbox: str | None


@dataclass
class _Grant:
    client: OAuthClient
    scope: str
    expires_at: float  # time.time() of the server


@dataclass
class AuthorizationServer:
    """Client-credentials token endpoint and RFC 7662 introspection endpoint on loopback."""

    token_lifetime: int = 3600
    resource_server: tuple[str, str] = field(default_factory=lambda: ("dovecot", "rs-" + secrets.token_hex(8)))
    introspected: list[str] = field(default_factory=list)   # tokens Dovecot asked about, in order
    introspection_status: int = 200                           # anything else: the endpoint fails
    _clients: dict[str, OAuthClient] = field(default_factory=dict)
    _grants: dict[str, _Grant] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/introspect", self._introspect)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def token_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/token"

    @property
    def introspection_url(self) -> str:
        """The URL Dovecot calls, with the resource server's Basic credentials in it."""
        user, password = self.resource_server
        return f"http://{user}:{password}@{LOOPBACK}:{self.port}/introspect"

    def register_client(self, mailbox: str | None) -> OAuthClient:
        client = OAuthClient(f"app-{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(16), mailbox)
        self._clients[client.client_id] = client
        return client

    def expire(self, token: str) -> None:
        self._grants[token].expires_at = time.time() - 1

    def client_of(self, token: str) -> OAuthClient | None:
        grant = self._grants.get(token)
        return grant.client if grant else None

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        client = self._clients.get(str(form.get("client_id", "")))
        if client is None or not secrets.compare_digest(client.secret, str(form.get("client_secret", ""))):
            return web.json_response({"error": "invalid_client"}, status=401)
        token = secrets.token_urlsafe(32)
        scope = str(form.get("scope", ""))
        self._grants[token] = _Grant(client, scope, time.time() + self.token_lifetime)
        return web.json_response({"access_token": token, "token_type": "Bearer",
                                  "expires_in": self.token_lifetime, "scope": scope})

    async def _introspect(self, request: web.Request) -> web.Response:
        if not self._is_resource_server(request.headers.get("Authorization", "")):
            return web.json_response({"error": "invalid_client"}, status=401,
                                     headers={"WWW-Authenticate": 'Basic realm="introspection"'})
        token = str((await request.post()).get("token", ""))
        self.introspected.append(token)
        if self.introspection_status != 200:
            return web.json_response({"error": "temporarily_unavailable"}, status=self.introspection_status)
        grant = self._grants.get(token)
        if grant is None or grant.expires_at <= time.time() or grant.client.mailbox is None:
            return web.json_response({"active": False})     # RFC 7662 2.2: nothing more
        return web.json_response({"active": True, "username": grant.client.mailbox, "scope": grant.scope,
                                  "client_id": grant.client.client_id, "token_type": "Bearer",
                                  "exp": int(grant.expires_at)})

    def _is_resource_server(self, authorization: str) -> bool:
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            return False
        expected_user, expected_password = self.resource_server
        return user == expected_user and secrets.compare_digest(password, expected_password)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def auth_server() -> AsyncIterator[AuthorizationServer]:
    server = AuthorizationServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def oauth_dovecot(tmp_path_factory, tls, auth_server) -> AsyncIterator[Dovecot]:
    """A Dovecot taking bearer tokens checked by `auth_server` (and passwords, as always)."""
    async with Dovecot(tmp_path_factory.mktemp("oauth-dovecot"), tls_cert=tls["cert"], tls_key=tls["key"],
                       oauth2=OAuth2Passdb(auth_server.introspection_url)) as server:
        yield server


@pytest.fixture(autouse=True)
def introspection_answers(auth_server):
    """Every test starts with a working introspection endpoint."""
    auth_server.introspection_status = 200


def unique_address() -> str:
    return f"x{uuid.uuid4().hex[:10]}@example.com"


async def token_for(auth_server: AuthorizationServer, client: OAuthClient) -> str:
    """A token from the token endpoint, the way ingest gets one (shared.oauth.TokenProvider)."""
    return await TokenProvider().token(auth_server.token_url, client.client_id, client.secret, SCOPE)


async def imap_session(dovecot: Dovecot, tls: dict) -> ImapClient:
    return await ImapClient.connect(dovecot.host, dovecot.imaps_port, tls="implicit", ssl_context=tls["client"],
                                    timeout=15)


async def pop3_session(dovecot: Dovecot, tls: dict) -> Pop3Client:
    return await Pop3Client.connect(dovecot.host, dovecot.pop3_port, tls="starttls", ssl_context=tls["client"],
                                    timeout=15)


async def logged(dovecot: Dovecot, *parts: str) -> None:
    """Wait until one line of Dovecot's log has all `parts` (the auth process logs just after replying)."""
    async def found() -> bool:
        return any(all(part in line for part in parts) for line in dovecot.log_tail(400).splitlines())
    await eventually(found, timeout=10, what=f"a line with {parts!r} in dovecot.log")


# -- the clients against Dovecot -------------------------------------------------------------------


async def test_imap_xoauth2_with_a_client_credentials_token_lists_and_fetches(oauth_dovecot, auth_server, tls):
    address = unique_address()
    delivered = [message(f"oauth imap {i}", to=address) for i in range(3)]
    oauth_dovecot.deliver_many(address, delivered)
    oauth_dovecot.deliver(address, message("archived"), folder="Archive")
    token = await token_for(auth_server, auth_server.register_client(address))
    client = await imap_session(oauth_dovecot, tls)
    try:
        assert {"AUTH=XOAUTH2", "SASL-IR"} <= client.capabilities
        await client.authenticate_xoauth2(address, token)
        assert sorted(await client.list_folders()) == ["Archive", "INBOX"]
        state = await client.select("INBOX")
        assert state.exists == 3
        fetched = [m async for m in client.fetch(await client.uids_since(0))]
        assert [m.raw for m in fetched] == delivered
    finally:
        await client.logout()
    assert auth_server.introspected[-1] == token      # Dovecot asked the authorization server


async def test_pop3_xoauth2_with_a_client_credentials_token_retrieves(oauth_dovecot, auth_server, tls):
    address = unique_address()
    delivered = [message(f"oauth pop3 {i}", to=address) for i in range(3)]
    oauth_dovecot.deliver_many(address, delivered)
    token = await token_for(auth_server, auth_server.register_client(address))
    client = await pop3_session(oauth_dovecot, tls)
    try:
        assert "XOAUTH2" in next(c for c in client.capabilities if c.startswith("SASL ")).split()
        await client.authenticate_xoauth2(address, token)
        assert (await client.stat())[0] == 3
        ids = await client.uidl()
        assert [raw async for _, raw in client.retr_many(sorted(ids))] == delivered
    finally:
        await client.quit()
    assert auth_server.introspected[-1] == token


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
@pytest.mark.parametrize("case", ["expired", "unknown", "granted_another_mailbox"])
async def test_a_token_dovecot_refuses_is_authentication_failed(oauth_dovecot, auth_server, tls, protocol, case):
    address = unique_address()
    oauth_dovecot.deliver(address, message("never read"))
    if case == "unknown":
        token, reason = secrets.token_urlsafe(32), "Provided token is not valid"
    else:
        granted = address if case == "expired" else unique_address()
        token = await token_for(auth_server, auth_server.register_client(granted))
        if case == "expired":
            session = await (imap_session if protocol == "imap" else pop3_session)(oauth_dovecot, tls)
            try:
                await session.authenticate_xoauth2(address, token)     # good until it expires
            finally:
                await session.close()
            auth_server.expire(token)
            reason = "Provided token is not valid"
        else:
            reason = f"Username '{address}' did not match '{granted}'"
    client = await (imap_session if protocol == "imap" else pop3_session)(oauth_dovecot, tls)
    try:
        with pytest.raises(AuthenticationFailed) as caught:
            await client.authenticate_xoauth2(address, token)
    finally:
        await client.close()
    text = str(caught.value)
    assert address in text and "Authentication failed" in text and token not in text
    assert caught.value.reason == "authentication_failed"
    assert auth_server.introspected[-1] == token
    # refused by the token check, for the reason the case is about
    await logged(oauth_dovecot, f"oauth2({address},", "oauth2 failed", reason)


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_an_introspection_outage_is_transient_not_a_wrong_token(oauth_dovecot, auth_server, tls, protocol):
    address = unique_address()
    token = await token_for(auth_server, auth_server.register_client(address))
    auth_server.introspection_status = 503
    client = await (imap_session if protocol == "imap" else pop3_session)(oauth_dovecot, tls)
    try:
        with pytest.raises(TransientError) as caught:   # retried after a back-off, not an alert for bad credentials
            await client.authenticate_xoauth2(address, token)
    finally:
        await client.close()
    assert not isinstance(caught.value, AuthenticationFailed)
    if protocol == "imap":
        assert isinstance(caught.value, ConnectionFailed) and "[UNAVAILABLE]" in str(caught.value)
    else:
        assert "[SYS/TEMP]" in str(caught.value)
    assert token not in str(caught.value)


async def test_passwords_and_tokens_go_to_their_own_passdb(oauth_dovecot, auth_server, tls):
    """PLAIN/LOGIN still use the passwd-files; a token sent as a password reaches no token check."""
    address, password = unique_address(), "pw-" + uuid.uuid4().hex[:8]
    oauth_dovecot.add_user(address, password)
    token = await token_for(auth_server, auth_server.register_client(address))
    asked = len(auth_server.introspected)
    client = await imap_session(oauth_dovecot, tls)
    try:
        with pytest.raises(AuthenticationFailed):
            await client.login(address, token)
    finally:
        await client.close()
    assert len(auth_server.introspected) == asked
    assert await oauth_dovecot.append(address, password, message("by password")) == 1   # PLAIN works


async def test_token_endpoint_refuses_a_wrong_client_secret(auth_server):
    client = auth_server.register_client(unique_address())
    wrong = "not-" + client.secret
    with pytest.raises(AuthenticationFailed) as caught:
        await TokenProvider().token(auth_server.token_url, client.client_id, wrong, SCOPE)
    assert "HTTP 401" in str(caught.value) and wrong not in str(caught.value)


# -- the ingest service with an oauth2 profile -----------------------------------------------------


def oauth_profile(dovecot: Dovecot, tls: dict, auth_server: AuthorizationServer, client: OAuthClient,
                  protocol: str) -> ProfileInput:
    """A profile signing in with `client`'s tokens, over TLS verified with the test CA."""
    oauth = {"auth_method": "oauth2", "oauth_token_url": auth_server.token_url,
             "oauth_client_id": client.client_id, "oauth_client_secret": SecretStr(client.secret),
             "oauth_scope": SCOPE, "tls_ca_file": str(tls["ca"])}
    if protocol == "imap":
        return imap_profile(dovecot, "oauth-imap", incoming_port=dovecot.imaps_port, incoming_tls="implicit", **oauth)
    return pop3_profile(dovecot, "oauth-pop3", incoming_tls="starttls", **oauth)


async def ingested(pool: asyncpg.Pool, mailbox_id: uuid.UUID) -> list[bytes]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("""SELECT r.data FROM ingested_message im JOIN raw_message r ON r.sha256 = im.raw_sha256
                                   WHERE im.mailbox_id = $1 ORDER BY im.uid, im.uidl""", mailbox_id)
    return [bytes(r["data"]) for r in rows]


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_ingest_signs_in_with_the_profiles_oauth_client(settings: Settings, registry: Registry, org, pool,
                                                              oauth_dovecot, auth_server, tls, protocol):
    client = auth_server.register_client(None)
    await registry.add_profile(org, oauth_profile(oauth_dovecot, tls, auth_server, client, protocol))
    box = await ready_mailbox(registry, org, oauth_dovecot)
    client.mailbox = box.email                       # the application is granted this mailbox
    raw = message(f"via oauth {protocol}", to=box.email)
    oauth_dovecot.deliver(box.email, raw)
    asked = len(auth_server.introspected)
    await run_service(IngestService(settings), burst=True)
    assert await ingested(pool, box.id) == [raw]
    mailbox = await registry.mailbox(org, box.email)
    assert mailbox.incoming.error_count == 0 and mailbox.alerts == []
    # Signed in with a token of the profile's client (other tests' mailboxes are synced too: burst
    # mode takes every ready mailbox of the database).
    assert any(auth_server.client_of(t) is client for t in auth_server.introspected[asked:])


async def test_ingest_with_a_token_not_granted_the_mailbox_alerts_without_the_token(
        settings: Settings, registry: Registry, org, pool, oauth_dovecot, auth_server, tls):
    client = auth_server.register_client(unique_address())   # granted some other mailbox
    await registry.add_profile(org, oauth_profile(oauth_dovecot, tls, auth_server, client, "imap"))
    box = await ready_mailbox(registry, org, oauth_dovecot)
    oauth_dovecot.deliver(box.email, message("not for this app"))
    asked = len(auth_server.introspected)
    await run_service(IngestService(settings), burst=True)
    assert await ingested(pool, box.id) == []
    mailbox = await registry.mailbox(org, box.email)
    assert mailbox.incoming.error_count == 1 and mailbox.incoming.backoff_until is not None
    [alert] = mailbox.alerts
    assert alert.code == "authentication_failed" and box.email in alert.message
    tokens = auth_server.introspected[asked:]
    assert tokens and not any(t in alert.message for t in tokens)
    assert client.secret not in alert.message
