"""Which transport sends a mailbox's email, and one interface over all of them.

Routed by the mailbox profile's ``server_type``: ``exchange_server`` -> EWS, ``exchange_online`` ->
Microsoft Graph ``sendMail``, everything else (``smtp``, and ``imap``/``pop3`` profiles, whose
outgoing side is SMTP) -> the pipelining SMTP pool.  Every transport is kept per (server, login)
and sized by the profile's maximum concurrent connections; an edited profile takes effect on the next
send (the SMTP pool is resized, an Exchange transport built again and the old one closed when idle).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from shared.errors import AuthenticationFailed, InvalidInput
from shared.oauth import TokenProvider
from shared.registry.models import DEFAULT_SUBMISSION_PORT
from shared.registry.service import MailboxWork, decode_bytea
from shared.tls import client_context

from .smtp_transport import SmtpCredentials, SmtpPool, SmtpServer, SmtpTransport

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Accepted:
    """The server took the message."""

    code: int | None = None
    reply: str | None = None
    refused_recipients: dict[str, tuple[int, str]] = field(default_factory=dict)


def transport_name(work: MailboxWork) -> str:
    server_type = work.profile["server_type"]
    return {"exchange_server": "ews", "exchange_online": "graph"}.get(server_type, "smtp")


# An Exchange transport unused this long is closed (its worker threads and pooled connections): a
# profile whose mailboxes sign in with their own credentials has one per mailbox that ever sent.
IDLE_TRANSPORT_SECONDS = 600.0


class Transports:
    """Every transport of a dispatch worker, created on first use (no I/O in the constructor)."""

    def __init__(self, *, timeout: float = 30.0, data_timeout: float | None = None,
                 helo_name: str | None = None, sent_items_window: float | None = None) -> None:
        # ``data_timeout``: the wait for an SMTP server's verdict on a message (``SmtpConnection``);
        # None: ``timeout``.
        self.smtp = SmtpTransport(helo_name=helo_name, timeout=timeout, data_timeout=data_timeout)
        self._timeout = timeout
        self._data_timeout = data_timeout
        # How long a Graph send answered 5xx is looked for in Sent Items before it counts as not sent
        # (``CONDUIT_DISPATCH_SENT_ITEMS_WINDOW_SECONDS``; None: the transport's default).
        self._sent_items_window = sent_items_window
        self._contexts: dict[str | None, ssl.SSLContext] = {}
        self._exchange: dict[tuple[Any, ...], _Held] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._swept_at = time.monotonic()   # when idle Exchange transports were last looked for
        self._tokens = TokenProvider()

    async def send(self, work: MailboxWork, raw: bytes, recipients: list[str]) -> Accepted:
        kind = transport_name(work)
        if kind == "smtp":
            return await self._send_smtp(work, raw, recipients)
        if kind == "ews":
            held, impersonate = self._ews(work)
            with self._using(held) as transport:
                await transport.send(work.email, raw, impersonate=impersonate)
            return Accepted()
        with self._using(self._graph(work)) as transport:
            found = await transport.send(work.email, raw)
        return Accepted(code=202, reply="Accepted") if found is None else Accepted(reply=found)

    async def find_sent(self, work: MailboxWork, message_id: str) -> bool | None:
        """Whether a message with this Message-ID (no angle brackets) is in the mailbox's Sent Items:
        True or False for Exchange transports; None for SMTP, which keeps no copy we could ask about."""
        kind = transport_name(work)
        if kind == "smtp":
            return None
        if kind == "ews":
            held, impersonate = self._ews(work)
            with self._using(held) as transport:
                return await transport.find_sent(work.email, f"<{message_id}>", impersonate=impersonate)
        with self._using(self._graph(work)) as transport:
            return await transport.find_sent(work.email, f"<{message_id}>")

    async def check(self, work: MailboxWork) -> None:
        """Test & Enable for outgoing email: reach the server and sign in with the mailbox's settings
        exactly as sending does (an SMTP session of its own, or the Exchange transport's check),
        without sending anything."""
        kind = transport_name(work)
        if kind == "smtp":
            credentials = await self._smtp_credentials(work)
            pool = SmtpPool(self._smtp_server(work), credentials, max_connections=1, timeout=self._timeout,
                            data_timeout=self._data_timeout)
            try:
                with self._forgetting_refused(credentials):
                    await pool.check()
            finally:
                await pool.close()
        elif kind == "ews":
            held, impersonate = self._ews(work)
            with self._using(held) as transport:
                await transport.check(work.email, impersonate=impersonate)
        else:
            with self._using(self._graph(work)) as transport:
                await transport.check(work.email)

    async def close(self) -> None:
        await self.smtp.close()
        held, self._exchange = list(self._exchange.values()), {}
        await asyncio.gather(*(_close_exchange(h.transport) for h in held), *self._closing)

    # -- SMTP

    async def _send_smtp(self, work: MailboxWork, raw: bytes, recipients: list[str]) -> Accepted:
        credentials = await self._smtp_credentials(work)
        pool = self.smtp.pool(self._smtp_server(work), credentials,
                              max_connections=work.profile["max_concurrent_connections"])
        with self._forgetting_refused(credentials):
            accepted = await pool.send(work.email, recipients, raw)
        return Accepted(accepted.code, accepted.text, accepted.refused_recipients)

    def _smtp_server(self, work: MailboxWork) -> SmtpServer:
        profile = work.profile
        tls = profile["outgoing_tls"]
        host = profile.get("outgoing_host") or profile.get("incoming_host")
        if not host:
            raise InvalidInput("the profile has no outgoing server", reason="no_outgoing_server")
        port = profile.get("outgoing_port") or DEFAULT_SUBMISSION_PORT[tls]
        return SmtpServer(host, port, tls, self._context(profile.get("tls_ca_file")) if tls != "none" else None)

    @contextlib.contextmanager
    def _forgetting_refused(self, credentials: SmtpCredentials | None) -> Iterator[None]:
        """A token the server refused is not offered again: the next attempt gets a new one (it may
        have been revoked long before it expires)."""
        try:
            yield
        except AuthenticationFailed:
            if credentials is not None and credentials.mechanism == "xoauth2":
                self._tokens.forget(credentials.secret)
            raise

    async def _smtp_credentials(self, work: MailboxWork) -> SmtpCredentials | None:
        profile = work.profile
        if profile["auth_method"] == "oauth2":
            token = await self._tokens.token(profile["oauth_token_url"], profile["oauth_client_id"],
                                             _profile_secret(work, "oauth_client_secret"), profile.get("oauth_scope"),
                                             ca_file=profile.get("tls_ca_file"))
            return SmtpCredentials(work.email, token, "xoauth2")
        if profile["auth_method"] == "mailbox_credentials" and work["secret"] is None:
            return None  # a relay that trusts its network (port 25 inside the organization)
        username, secret = work.login()
        return SmtpCredentials(username, secret.get_secret_value(), "plain")

    def _context(self, ca_file: str | None) -> ssl.SSLContext:
        # One context per CA file: building one costs milliseconds, and pools are keyed by it.
        if ca_file not in self._contexts:
            self._contexts[ca_file] = client_context(ca_file)
        return self._contexts[ca_file]

    # -- Exchange (services/dispatch/exchange_transport.py)

    def _ews(self, work: MailboxWork) -> tuple[_Held, bool]:
        from .exchange_transport import EwsOAuth, EwsTransport

        profile = work.profile
        if profile["auth_method"] == "oauth2":
            credentials: Any = EwsOAuth(client_id=profile["oauth_client_id"],
                                        client_secret=_profile_secret(work, "oauth_client_secret"),
                                        token_url=profile["oauth_token_url"],
                                        **({"scope": profile["oauth_scope"]} if profile.get("oauth_scope") else {}))
            impersonate = True
        else:
            username, secret = work.login()
            credentials = (username, secret.get_secret_value())
            impersonate = profile["auth_method"] == "profile_impersonation"
        login = credentials.client_id if isinstance(credentials, EwsOAuth) else credentials[0]
        held = self._exchange_for(
            ("ews", profile["id"], login),
            # hash(credentials), not of its text: EwsOAuth leaves its secret out of repr(), not out of hash().
            (profile["service_url"], profile.get("tls_ca_file"), profile["max_concurrent_connections"], hash(credentials)),
            lambda: EwsTransport(service_url=profile["service_url"], credentials=credentials,
                                 ca_file=profile.get("tls_ca_file"),
                                 max_connections=profile["max_concurrent_connections"], timeout=self._timeout * 2))
        return held, impersonate

    def _graph(self, work: MailboxWork) -> _Held:
        from .exchange_transport import GraphTransport

        profile = work.profile
        if not (profile.get("oauth_token_url") and profile.get("oauth_client_id") and profile.get("oauth_client_secret")):
            raise InvalidInput("an Exchange Online profile needs OAuth 2.0 client credentials", reason="missing_credentials")
        secret = _profile_secret(work, "oauth_client_secret")
        kwargs: dict[str, Any] = {"scope": profile["oauth_scope"]} if profile.get("oauth_scope") else {}
        return self._exchange_for(
            ("graph", profile["id"]),
            (profile["service_url"], profile["oauth_token_url"], profile["oauth_client_id"], hash(secret),
             profile.get("oauth_scope"), profile.get("tls_ca_file"), profile["max_concurrent_connections"]),
            lambda: GraphTransport(graph_url=profile["service_url"], token_url=profile["oauth_token_url"],
                                   client_id=profile["oauth_client_id"], client_secret=secret,
                                   verify_tls=profile.get("tls_ca_file") or True,
                                   max_connections=profile["max_concurrent_connections"], timeout=self._timeout,
                                   sent_items_window=self._sent_items_window, **kwargs))

    def _exchange_for(self, key: tuple[Any, ...], settings: tuple[Any, ...], build: Callable[[], Any]) -> _Held:
        """The transport for a profile (and login), built again when the profile's settings changed
        (a rotated secret, a new connection limit); the one it replaces closes once its calls end."""
        self._close_idle()
        held = self._exchange.get(key)
        if held is not None and held.settings == settings:
            return held
        if held is not None:
            held.replaced = True
            if held.calls == 0:
                self._close_later(held)
        held = self._exchange[key] = _Held(settings, build())
        return held

    def sweep_idle(self) -> None:
        """Close the SMTP pools and Exchange transports left unused (a send looks too, but a replica
        whose mailboxes went quiet would keep their sessions and threads for good)."""
        self.smtp.sweep_idle()
        self._close_idle()

    def _close_idle(self) -> None:
        now = time.monotonic()
        if now - self._swept_at < IDLE_TRANSPORT_SECONDS / 10:   # not a walk over them all at every send
            return
        self._swept_at = now
        for key, held in list(self._exchange.items()):
            if held.calls == 0 and now - held.last_used > IDLE_TRANSPORT_SECONDS:
                del self._exchange[key]
                self._close_later(held)

    @contextlib.contextmanager
    def _using(self, held: _Held) -> Iterator[Any]:
        held.calls += 1
        try:
            yield held.transport
        finally:
            held.last_used = time.monotonic()
            held.calls -= 1
            if held.replaced and held.calls == 0:
                self._close_later(held)

    def _close_later(self, held: _Held) -> None:
        task = asyncio.get_running_loop().create_task(_close_exchange(held.transport))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


@dataclass
class _Held:
    """An Exchange transport, the profile settings it was built from, and its calls under way."""

    settings: tuple[Any, ...]
    transport: Any
    calls: int = 0
    replaced: bool = False
    last_used: float = field(default_factory=time.monotonic)


async def _close_exchange(transport: Any) -> None:
    try:
        await transport.close()
    except Exception as exc:  # noqa: BLE001 - closing: report, go on
        log.warning("closing an Exchange transport failed: %s", exc)


def _profile_secret(work: MailboxWork, column: str) -> str:
    value = work.profile.get(column)
    if not value:
        raise InvalidInput(f"the profile has no {column.replace('_', ' ')}", reason="missing_credentials")
    return work.cipher.decrypt(decode_bytea(value)).get_secret_value()
