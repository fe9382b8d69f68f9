"""The Exchange transports of the dispatch service: send an already built RFC 5322 message as a mailbox.

- ``EwsTransport``: Exchange Server on-premises through EWS with ``exchangelib``.  The message is
  uploaded as MIME content (``CreateItem`` with ``MessageDisposition="SendAndSaveCopy"`` and
  ``SavedItemFolderId`` Sent Items), so Exchange keeps our ``Message-ID`` and every header we built; the
  recipients come from the MIME ``To``/``Cc``/``Bcc`` headers, as Exchange reads them.  exchangelib is
  synchronous: every call runs in a thread pool of ``max_connections`` workers, and exchangelib's own
  session pool has the same size, so at most ``max_connections`` connections reach one server.
- ``GraphTransport``: Exchange Online through Microsoft Graph, ``POST /users/{id}/sendMail`` in MIME
  format (``Content-Type: text/plain``, the base64 MIME as body; 202 Accepted), with app-only tokens
  from the OAuth 2.0 client credentials grant, cached until shortly before they expire.  One
  ``httpx.AsyncClient`` keeps an HTTP/1.1 keep-alive pool of ``max_connections``.

Errors become the shared taxonomy: a refused login is ``AuthenticationFailed``; throttling and busy
servers (HTTP 429/503, ``ErrorServerBusy``) are ``ExchangeTransientError`` with the server's back-off
hint in ``retry_after`` (seconds); a refused message (an EWS error response, a Graph 4xx) is
``ExchangePermanentError`` with the server's ``code`` and message.  A Graph ``sendMail`` answered
with any other 5xx (a gateway's 504, a 500) may have been sent all the same: it is looked for in Sent
Items first, and is an error (to be retried) only if it is not there (``GraphTransport.send``).  TLS is
verified unless a profile turns it off; no error or log line carries a password, secret or token.
exchangelib logs request headers (an ``Authorization``) and bodies at DEBUG, and at ERROR when a
request fails unexpectedly: ``shared/logs.py`` drops its records (and oauthlib's).  An EWS answer that
is not EWS (a gateway's page) is classified by its real HTTP status, which the transport's adapter
records, not by exchangelib's label (``_http_answer_error``).

A failed connection is classified by whether the request can have reached Exchange.  Before it was
written (refused, unresolvable, a failed TLS handshake, a connect or pool timeout) nothing was sent:
``ConnectionFailed`` (``TlsFailed``), safe to retry.  Once it was written (a read timeout, the server
closing or resetting the connection without an answer, a TLS stream cut short) Exchange may have
acted on it: the error is marked ``after_write``, and a send's error carries ``request_sent = True``,
which the caller resolves by looking in Sent Items (``find_sent``) instead of sending again.

Retries are the caller's (the send ledger's): a transport never resends.  A send cancelled while its
thread is inside exchangelib still completes or fails in that thread; its outcome is then unknown.
An EWS call is bounded as a whole (``call_timeout``): given up on inside exchangelib, a send is a lost
answer (``request_sent``); given up on while waiting for a thread, it never starts.  A Graph call is
bounded the same way, its token, its request and the reading of its answer: given up on once the
``sendMail`` request began to be written, a lost answer; before (the token endpoint, the connection,
a wait for one of the transport's own connections), nothing was sent.

Graph's Outlook limits per app and mailbox are kept, not only answered: at most 4 requests at once
(``_mailbox_turn``) and at most 150 MB of uploads in 5 minutes (``_upload_room``); a send waits for its
mailbox's turn, outside the call's time bound, instead of being refused with 429.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import email.policy
import http.client
import logging
import re
import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from shared.errors import (
    AuthenticationFailed,
    ConduitError,
    ConnectionFailed,
    InvalidInput,
    PermanentError,
    ProtocolTimeout,
    TlsFailed,
    TransientError,
)
from shared.tls import client_context

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound=Exception)

# Graph refuses sendMail requests over 4 MB; larger messages need an upload session (not done here).
GRAPH_MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Outlook's Graph limit: at most 4 requests at once per app and mailbox; more are refused with 429
# MailboxConcurrency, each costing the message an attempt and a Retry-After wait
# (learn.microsoft.com/graph/throttling-limits, "Outlook service limits").
GRAPH_MAILBOX_CONCURRENCY = 4
# Outlook's Graph limit per app ID and mailbox: "150 megabytes (MB) upload (PATCH, POST, PUT) in a 5
# minute period" (https://learn.microsoft.com/en-us/graph/throttling-limits, "Outlook service limits";
# beyond it, 429 ApplicationThrottled "Application is over its IncomingBytes limit").  Counted here
# as a sendMail's body, in decimal megabytes: the smaller reading of "MB", so that either reading holds.
GRAPH_UPLOAD_BUDGET = 150 * 1000 * 1000
GRAPH_UPLOAD_WINDOW = 300.0
# A Graph call makes up to four HTTP requests (a token, the request, and after a 401 a fresh token and
# the request again), each step bounded by the transport's timeout; the whole call by this many
# timeouts.  httpx's timeouts are per step: a server that trickles its answer never trips them.
GRAPH_TIMEOUTS_PER_CALL = 5
# Renew a token this long before it expires, so a request never leaves with a token about to die.
TOKEN_RENEW_MARGIN = 120.0
# A sendMail answered with an error after which it may have gone out is looked for in Sent Items this
# long (pauses doubling from the first) before it is sent again: Graph files its copy seconds after it
# accepted a message.  Dispatch passes its CONDUIT_DISPATCH_SENT_ITEMS_WINDOW_SECONDS (the same default).
SENT_ITEMS_WINDOW = 10.0
SENT_ITEMS_FIRST_PAUSE = 0.5
# An EWS call makes up to four HTTP requests (the version probe, GetFolder, CreateItem, FindItem), each
# bounded by the transport's timeout; the whole call, its wait for a worker thread included, by this
# many timeouts.
EWS_REQUESTS_PER_CALL = 5
# How many mailboxes an EWS transport keeps an exchangelib Account for (folder ids, version): the last used.
ACCOUNTS_KEPT = 256


class ExchangeTransientError(TransientError):
    """Worth retrying: throttled, busy or briefly unavailable.  ``retry_after``: the server's hint, seconds."""

    def __init__(self, message: str, *, reason: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, reason=reason)
        self.code = code
        self.retry_after = retry_after


class ExchangePermanentError(PermanentError):
    """Exchange refused this message or mailbox; ``code`` is the server's error code."""

    def __init__(self, message: str, *, code: str, reason: str | None = None) -> None:
        super().__init__(message, reason=reason or "rejected")
        self.code = code


def _message_id(message: bytes) -> str:
    """The message's ``Message-ID``; a message without headers or without one is refused."""
    if not isinstance(message, (bytes, bytearray)) or not message.strip():
        raise InvalidInput("the message is empty", reason="invalid_message")
    headers = BytesHeaderParser(policy=email.policy.default).parsebytes(bytes(message))
    mid = headers.get("Message-ID")
    if not mid or not str(mid).strip():
        raise InvalidInput("the message has no Message-ID header", reason="invalid_message")
    return str(mid).strip()


def _check_address(address: str) -> None:
    if not address or "@" not in address or any(c in address for c in "/\\?#\r\n \t"):
        raise InvalidInput(f"not a mailbox address: {address!r}", reason="invalid_address")


def _after_write(error: E, written: bool = True) -> E:
    """Mark ``error``: did it happen once the request was (perhaps only partly) written?"""
    error.after_write = written  # type: ignore[attr-defined]
    return error


# ---------------------------------------------------------------------------------------------- EWS


@dataclass(frozen=True)
class EwsOAuth:
    """App-only OAuth 2.0 (client credentials) for EWS; the app must hold ``full_access_as_app``.

    App-only EWS always impersonates the mailbox, as Exchange requires for such tokens.
    """

    client_id: str
    client_secret: str = field(repr=False)
    tenant_id: str = "common"
    token_url: str | None = None  # default: the Microsoft identity platform endpoint of ``tenant_id``
    scope: str = "https://outlook.office365.com/.default"


class EwsTransport:
    """Sends through EWS as the mailbox owner (delegate access or ApplicationImpersonation)."""

    def __init__(self, *, service_url: str, credentials: tuple[str, str] | EwsOAuth, verify_tls: bool = True,
                 ca_file: str | None = None, max_connections: int = 10, auth_type: str = "basic",
                 timeout: float = 60.0, call_timeout: float | None = None) -> None:
        """``timeout``: each HTTP request's; ``call_timeout``: a whole call's (send, look-up, check), its
        wait for a worker thread included (default ``EWS_REQUESTS_PER_CALL`` times ``timeout``)."""
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.service_url = service_url
        self.max_connections = max_connections
        self._oauth = isinstance(credentials, EwsOAuth)
        self._credentials = credentials
        self._verify: bool | str = (ca_file or True) if verify_tls else False
        self._auth_type = auth_type
        self._timeout = timeout
        self._call_timeout = EWS_REQUESTS_PER_CALL * timeout if call_timeout is None else call_timeout
        self._executor = ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="ews-transport")
        self._lock = threading.Lock()
        self._protocol: Any = None  # built on first use, in a worker thread (exchangelib setup is blocking)
        # The mailboxes sent for most recently (``ACCOUNTS_KEPT``): on an impersonation or OAuth
        # profile one transport sends for every mailbox, and it must not keep each one ever seen.
        self._accounts: OrderedDict[tuple[str, bool], Any] = OrderedDict()
        self._closed = False

    async def send(self, mailbox_address: str, message: bytes, *, impersonate: bool = False) -> str:
        """Send ``message`` as ``mailbox_address`` and keep a copy in its Sent Items.

        Returns the EWS ItemId of that copy, found by our Message-ID; if Exchange has not filed it yet
        when we look, the Message-ID itself (which, unlike an ItemId, starts with ``<``).
        """
        _check_address(mailbox_address)
        message_id = _message_id(message)
        submitted = threading.Event()   # set by the worker thread as CreateItem starts
        try:
            return await self._run(self._send_blocking, mailbox_address, bytes(message), message_id, impersonate,
                                   submitted)
        except ProtocolTimeout as e:
            # Given up on, or timed out, once CreateItem was on its way: the message may have gone out.
            # Before it (the version probe, the Sent Items folder's GetFolder) nothing was sent.
            if not hasattr(e, "request_sent"):
                e.request_sent = submitted.is_set() and getattr(e, "after_write", False)  # type: ignore[attr-defined]
            raise

    async def find_sent(self, mailbox_address: str, message_id: str, *, impersonate: bool = False) -> bool:
        """Whether the mailbox's Sent Items holds a message with this ``Message-ID`` (with its angle
        brackets): FindItem restricted on ``message:InternetMessageId``.  Resolves a send whose outcome
        was lost: ``SendAndSaveCopy`` files the copy as it sends."""
        _check_address(mailbox_address)
        return await self._run(self._find_sent_blocking, mailbox_address, message_id, impersonate)

    async def check(self, mailbox_address: str, *, impersonate: bool = False) -> None:
        """Test & Enable: log in, negotiate the server version and open Inbox and Sent Items."""
        _check_address(mailbox_address)
        await self._run(self._check_blocking, mailbox_address, impersonate)

    async def close(self) -> None:
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown_blocking)

    # -- worker-thread side

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise ConnectionFailed("the EWS transport is closed", reason="transport_closed")
        loop = asyncio.get_running_loop()
        call = _Call(_translating(fn))
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._executor, call.run, *args), self._call_timeout)
        except TimeoutError:
            # A call that never returns (an Exchange that stops answering mid-stream, a library
            # deadlock) must not hold its message and the service's stop forever.
            if call.abandon():
                raise _after_write(ProtocolTimeout(f"the EWS call did not finish within {self._call_timeout:g} s")) \
                    from None
            # Queued behind this transport's other calls: Conduit's own congestion, not the server's
            # fault (no back-off of the mailbox), and certainly not sent.
            raise _after_write(ProtocolTimeout(
                f"the EWS call did not start within {self._call_timeout:g} s: every connection was busy",
                reason="transport_busy"), False) from None
        except asyncio.CancelledError:
            call.abandon()  # a call still queued is not started later, when nobody waits for it
            raise
        except ConduitError as e:
            # A server's or library's text may repeat what it was sent (a gateway echoing the token
            # request's form): the message goes into status events, the ledger and logs.
            secret = self._credentials.client_secret if isinstance(self._credentials, EwsOAuth) else self._credentials[1]
            e.args = (_redacted(e.message, secret), *e.args[1:])
            raise

    def _send_blocking(self, address: str, message: bytes, message_id: str, impersonate: bool,
                       submitted: threading.Event) -> str:
        from exchangelib import Message

        account = self._account(address, impersonate)
        sent_items = account.sent  # GetFolder on first use; a failure up to here: nothing was sent
        submitted.set()
        try:
            Message(account=account, folder=sent_items, mime_content=message).send_and_save()
        except Exception as e:  # noqa: BLE001 - mapped once, marked: the request may have reached Exchange
            error = e if isinstance(e, (InvalidInput, TransientError, PermanentError)) else _ews_error(e)
            # CreateItem was written and no answer came back (a timeout, a dropped connection): whether
            # the message went out is unknown.
            error.request_sent = getattr(error, "after_write", False)  # type: ignore[attr-defined]
            raise error from None
        try:
            found = list(account.sent.filter(message_id=message_id).values_list("id", flat=True)[:1])
        except Exception as e:  # noqa: BLE001 - sent already: a failed look-up must not fail the send
            log.info("sent; finding the Sent Items copy failed (%s)", type(e).__name__)
            return message_id
        return found[0] if found else message_id

    def _find_sent_blocking(self, address: str, message_id: str, impersonate: bool) -> bool:
        account = self._account(address, impersonate)
        return bool(list(account.sent.filter(message_id=message_id).values_list("id", flat=True)[:1]))

    def _check_blocking(self, address: str, impersonate: bool) -> None:
        account = self._account(address, impersonate)
        account.inbox  # noqa: B018 - GetFolder: proves login, version and access to the mailbox
        account.sent  # noqa: B018

    def _account(self, address: str, impersonate: bool) -> Any:
        from exchangelib import DELEGATE, IMPERSONATION, UTC, Account, Identity
        from exchangelib.protocol import CachingProtocol

        impersonate = impersonate or self._oauth
        key = (address.lower(), impersonate)
        with self._lock:
            account = self._accounts.get(key)
            if account is not None:
                self._accounts.move_to_end(key)
                return account
            protocol = self._ensure_protocol()
            if self._oauth:
                _probe_version_as(protocol, Identity(primary_smtp_address=address))
            account = Account(primary_smtp_address=address, config=protocol.config, autodiscover=False,
                              access_type=IMPERSONATION if impersonate else DELEGATE, default_timezone=UTC)
            # Account() fetched a shared, process-wide cached Protocol; use ours (our TLS settings, our
            # pool) and drop the cached one so the cache holds nothing of this transport.
            if account.protocol is not protocol:
                with CachingProtocol._protocol_cache_lock:
                    CachingProtocol._protocol_cache.pop(CachingProtocol._cache_key(protocol.config), None)
                account.protocol = protocol
            self._accounts[key] = account
            if len(self._accounts) > ACCOUNTS_KEPT:
                self._accounts.popitem(last=False)   # built again, cheaply, if it sends again
            return account

    def _ensure_protocol(self) -> Any:
        if self._protocol is None:
            from exchangelib import BASIC, NTLM, Configuration, Credentials

            if isinstance(self._credentials, EwsOAuth):
                creds: Any = _oauth_credentials(self._credentials)
                auth_type = None  # exchangelib picks OAuth 2.0 for OAuth credentials
            else:
                username, password = self._credentials
                creds = Credentials(username, password)
                auth_type = {"basic": BASIC, "ntlm": NTLM}[self._auth_type.lower()]
            config = Configuration(service_endpoint=self.service_url, credentials=creds, auth_type=auth_type,
                                   max_connections=self.max_connections)
            protocol_cls = _protocol_class(self._verify)
            protocol_cls.TIMEOUT = self._timeout
            # Not protocol_cls(config=...): exchangelib's metaclass would share the instance process-wide.
            protocol = protocol_cls.__new__(protocol_cls)
            protocol.__init__(config=config)
            self._protocol = protocol
        return self._protocol

    def _shutdown_blocking(self) -> None:
        # Not waiting for calls given up on (a server that drips its answer): they end with their
        # HTTP timeouts, and the service's stop must not wait for them.
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            if self._protocol is not None:
                self._protocol.close()
            self._accounts.clear()


def _probe_version_as(protocol: Any, identity: Any) -> None:
    """Learn the server's version, if not known yet, impersonating ``identity``.

    exchangelib's version probe is a protocol-level call, and app-only tokens must impersonate a
    mailbox in every call: it impersonates ``protocol.credentials.identity``.  The probe runs here, as
    the mailbox being opened (under the transport's lock), and a refusal leaves no identity behind: a
    mailbox the app may not impersonate fails alone, with Exchange's code, instead of every later
    mailbox of the profile probing as it and failing the same way.
    """
    version = protocol.config.version
    if version is not None and version.build is not None:
        return
    known = protocol.credentials.identity
    protocol.credentials.identity = identity
    try:
        protocol.version  # noqa: B018 - the probe (ConvertId), once per protocol
    except Exception:
        protocol.credentials.identity = known
        raise


def _oauth_credentials(oauth: EwsOAuth) -> Any:
    from exchangelib import OAuth2Credentials

    class _ClientCredentials(OAuth2Credentials):
        # exchangelib hard-codes login.microsoftonline.com; a profile may name its own authority.
        @property
        def token_url(self) -> str:
            return oauth.token_url or super().token_url

        @property
        def scope(self) -> list[str]:
            return [oauth.scope]

    return _ClientCredentials(client_id=oauth.client_id, client_secret=oauth.client_secret,
                              tenant_id=oauth.tenant_id)


def _protocol_class(verify: bool | str) -> type:
    """An exchangelib Protocol whose HTTP sessions verify TLS with ``verify`` (True, a CA file, or False).

    The setting lives in the adapter, not in ``session.verify``: requests lets ``REQUESTS_CA_BUNDLE``
    override a session's setting, which would silently drop a profile's private CA.
    """
    import requests.adapters
    from exchangelib.protocol import Protocol

    class _VerifyingAdapter(requests.adapters.HTTPAdapter):
        def send(self, request, *args, **kwargs):  # type: ignore[no-untyped-def]
            kwargs["verify"] = verify
            # EWS requests are SOAP; the other requests on these sessions are OAuth token requests (a
            # form), made again as exchangelib retires a session after an error answer.
            slot = "ews" if request.headers.get("Content-Type", "").startswith("text/xml") else "token"
            setattr(_answers, slot, None)  # no answer yet: a request that fails leaves none behind
            response = super().send(request, *args, **kwargs)
            setattr(_answers, slot, _HttpAnswer(response.status_code, response.headers))
            return response

    class _VerifyingProtocol(Protocol):
        HTTP_ADAPTER_CLS = _VerifyingAdapter

        def decrease_poolsize(self) -> None:
            # exchangelib shrinks its session pool on every ErrorServerBusy (and ErrorTimeoutExpired...)
            # while holding the pool's non-reentrant lock, and takes a session to close under it; if
            # none is idle it grows the pool, which takes the same lock: the thread deadlocks, and
            # every other one queues behind it.  The transport bounds concurrency itself (its thread
            # pool), and the busy answer goes back to the caller with its back-off, so the pool
            # keeps its size.  exchangelib ignores this error.
            from exchangelib.errors import SessionPoolMinSizeReached

            raise SessionPoolMinSizeReached("the EWS transport bounds its own concurrency")

    return _VerifyingProtocol


class _Call:
    """One call handed to the transport's thread pool, which can be given up on: once abandoned, a call
    still waiting for a thread never starts, and one already started says so (it may have reached
    Exchange)."""

    def __init__(self, fn: Callable[..., T]) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self._began = False
        self._abandoned = False

    def run(self, *args: Any) -> Any:
        with self._lock:
            if self._abandoned:
                raise ConnectionFailed("the EWS call was given up on before it started")
            self._began = True
        return self._fn(*args)

    def abandon(self) -> bool:
        """Give the call up; whether it had started."""
        with self._lock:
            self._abandoned = True
            return self._began


@dataclass(frozen=True)
class _HttpAnswer:
    """What the server (or a gateway in front of it) really answered: exchangelib's error says less."""

    status: int
    headers: Mapping[str, str]

    @property
    def soap(self) -> bool:
        """An answer exchangelib reads as EWS: a 200, or a SOAP fault (500, XML)."""
        return self.status == 200 or self.status == 500 and "xml" in self.headers.get("Content-Type", "")


# The last EWS answer (``ews``) and token endpoint answer (``token``) of each worker thread's current
# call (a call runs in one thread, start to end).
_answers = threading.local()


def _translating(fn: Callable[..., T]) -> Callable[..., T]:
    def run(*args: Any) -> T:
        _answers.ews = _answers.token = None
        try:
            return fn(*args)
        except (InvalidInput, TransientError, PermanentError):
            raise
        except Exception as e:  # noqa: BLE001 - exchangelib raises its own hierarchy; mapped once, here
            raise _ews_error(e) from None
    return run


_EWS_TRANSIENT_CODES = {
    "ErrorServerBusy", "ErrorInternalServerTransientError", "ErrorTimeoutExpired", "ErrorMailboxStoreUnavailable",
    "ErrorTooManyObjectsOpened", "ErrorMailboxMoveInProgress", "ErrorConnectionFailed", "ErrorExceededConnectionCount",
    "ErrorInsufficientResources", "ErrorBatchProcessingStopped",
}


def _ews_error(e: Exception) -> Exception:
    from exchangelib.errors import (
        CASError,
        ErrorServerBusy,
        MalformedResponseError,
        RateLimitError,
        RedirectError,
        ResponseMessageError,
        TransportError,
        UnauthorizedError,
    )
    from requests.exceptions import SSLError

    code = type(e).__name__
    text = str(e)
    chain = [e, e.__cause__, e.__context__]
    unavailable = _ews_token_unavailable(e)
    if unavailable is not None:
        return unavailable
    if isinstance(e, UnauthorizedError) or code in ("InvalidClientIdError", "InvalidClientError",
                                                     "UnauthorizedClientError"):
        return AuthenticationFailed(f"EWS refused the credentials ({code})")
    # Before the server's answer: exchangelib re-raises a failed HTTP exchange as ErrorTimeoutExpired,
    # or as ErrorServerBusy once it holds more than one session, so the type alone says too little.
    wire = _ews_wire_error(e)
    if wire is not None:
        return wire
    page = _http_answer_error(e)
    if page is not None:
        return page
    refusal = _probe_refusal(e)
    if refusal is not None:
        return _ews_error(refusal)
    if isinstance(e, ErrorServerBusy):
        return ExchangeTransientError(f"EWS server busy: {text}", reason="server_busy", code="ErrorServerBusy",
                                      retry_after=e.back_off)
    if isinstance(e, RateLimitError):
        return ExchangeTransientError(f"EWS throttled: {text}", reason="throttled", code=code,
                                      retry_after=getattr(e, "wait", None))
    if isinstance(e, ResponseMessageError):
        if code in _EWS_TRANSIENT_CODES:
            # Exchange's own ErrorTimeoutExpired: it gave up on a request it had started working on.
            return _after_write(ExchangeTransientError(f"EWS {code}: {text}", reason="server_busy", code=code),
                                code == "ErrorTimeoutExpired")
        return ExchangePermanentError(f"EWS {code}: {text}", code=code)
    if any(isinstance(c, (SSLError, ssl.SSLError)) for c in chain) or "CERTIFICATE_VERIFY_FAILED" in text \
            or "SSLError" in text:
        return TlsFailed("TLS with the EWS server failed: certificate not trusted or handshake refused")
    if isinstance(e, (CASError, RedirectError)):
        return ExchangePermanentError(f"EWS front end refused the request: {text}", code=code)
    if isinstance(e, MalformedResponseError):
        # An answer came, but not an EWS one: a gateway's 502 or 504 page, say.  The request reached
        # the front end, which may have passed it on: what it did is unknown (a send is looked for in
        # Sent Items, never simply sent again).
        return _after_write(ExchangeTransientError(f"EWS answered with something that is not EWS: {text[:200]}",
                                                   reason="protocol_error", code=code))
    if "ConnectionError" in text or "ConnectTimeout" in text:  # a connection failure known only by its text
        if "ReadTimeout" in text:
            return ProtocolTimeout("the EWS server did not answer in time")
        return ConnectionFailed(f"could not reach the EWS server ({code})")
    if isinstance(e, TransportError):
        # The server answered (no failed HTTP exchange underneath), but not as EWS should: no version
        # header, an unknown response code.  Not "unreachable", which backs the mailbox off.
        return ExchangeTransientError(f"EWS answered unexpectedly: {code}: {text[:200]}", reason="protocol_error",
                                      code=code)
    if code == "TokenExpiredError":
        return AuthenticationFailed("the EWS OAuth token could not be renewed")
    if type(e).__module__.startswith("oauthlib."):
        # oauthlib's text carries the token endpoint's description, which may repeat the request.
        return AuthenticationFailed(f"the EWS OAuth token request failed ({code})")
    return ExchangeTransientError(f"unexpected EWS failure: {code}: {text}", reason="protocol_error", code=code)


# An OAuth 2.0 error code (RFC 6749 5.2: "invalid_client"); anything else is not repeated.
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def _redacted(text: str, secret: str) -> str:
    """``text`` without ``secret``, nor its URL-encoded form (a form body echoed back)."""
    for form in {secret, quote(secret, safe=""), quote(secret, safe="").replace("%20", "+")}:
        if len(form) >= 4:
            text = text.replace(form, "[redacted]")
    return text


def _ews_wire_error(e: BaseException) -> Exception | None:
    """The failed HTTP exchange under an exchangelib error (requests, urllib3 or the socket), mapped by
    whether the request can have reached Exchange; None if no HTTP exchange failed."""
    import requests
    from urllib3.exceptions import ConnectTimeoutError, ReadTimeoutError
    from urllib3.exceptions import HTTPError as Urllib3Error

    causes = _causes(e)
    if not any(isinstance(c, (requests.RequestException, Urllib3Error, http.client.HTTPException, ConnectionError,
                              TimeoutError, ssl.SSLError)) for c in causes):
        return None
    # A TLS stream that ends without close_notify is a connection cut short, at any point of the
    # exchange; other TLS errors come from the handshake (untrusted certificate, refused protocol).
    cut = any(isinstance(c, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or "UNEXPECTED_EOF" in str(c)
              for c in causes)
    if not cut and any(isinstance(c, (requests.exceptions.SSLError, ssl.SSLError)) for c in causes):
        return TlsFailed("TLS with the EWS server failed: certificate not trusted or handshake refused")
    # NewConnectionError (refused, unresolvable) is a ConnectTimeoutError too: no connection, nothing written.
    if any(isinstance(c, (ConnectTimeoutError, requests.exceptions.ConnectTimeout, ConnectionRefusedError))
           for c in causes):
        return ConnectionFailed("could not reach the EWS server")
    if any(isinstance(c, (requests.exceptions.ReadTimeout, ReadTimeoutError, TimeoutError)) for c in causes):
        return _after_write(ProtocolTimeout("the EWS server did not answer in time"))
    # Closed or reset without an answer (urllib3 reads the answer even after a failed write, so this
    # is also how a request cut off while being written ends).
    dropped = next((c for c in reversed(causes) if isinstance(c, (ConnectionError, http.client.HTTPException,
                                                                   ssl.SSLError))), causes[-1])
    return _after_write(ConnectionFailed(
        f"the connection to the EWS server dropped after the request was sent ({type(dropped).__name__})"))


def _ews_token_unavailable(e: BaseException) -> Exception | None:
    """oauthlib's error for a token endpoint that throttles or is down (429 or 5xx, RFC 6749's
    ``temporarily_unavailable`` and ``server_error``): the credentials may be fine, so it is what the
    Graph path makes of it (``_token_endpoint_busy``), not a refused login; None for any other error.
    The token request went through the transport's adapter, which kept its status and ``Retry-After``."""
    if not type(e).__module__.startswith("oauthlib."):
        return None
    answer: _HttpAnswer | None = getattr(_answers, "token", None)
    status = answer.status if answer is not None else None
    error = str(getattr(e, "error", "") or "")  # the token endpoint's RFC 6749 code, as oauthlib read it
    code = error if _ERROR_CODE.fullmatch(error) else type(e).__name__
    temporary = code in ("temporarily_unavailable", "server_error") or status is not None and _busy_status(status)
    if not temporary:
        return None
    return _token_endpoint_busy(status, code, _retry_after(answer.headers) if answer is not None else None)


def _busy_status(status: int) -> bool:
    return status == 429 or status >= 500


def _token_endpoint_busy(status: int | None, code: str, retry_after: float | None) -> Exception:
    """A token endpoint throttling or briefly down (Microsoft's identity platform answers 429 with a
    Retry-After when overloaded): retried after that time, never an authentication failure."""
    return ExchangeTransientError(f"token endpoint: {status or 'error'} {code}", reason="throttled", code=code,
                                  retry_after=retry_after)


def _http_answer_error(e: BaseException) -> Exception | None:
    """The error an HTTP answer that is not EWS makes, by its real status; None for an EWS answer.

    exchangelib labels such answers by their headers first: any of them with ``Connection: close`` (a
    gateway's 502 or 504 page often has it, even a 401) becomes ``ErrorServerBusy("Caused by closed
    connection")``, retried as if nothing was done, and a 503 loses its ``Retry-After`` (only
    exchangelib's fault-tolerant policy keeps it).  By status: 401 is a refused login; 429 and 503
    a request refused before any work, to be repeated (after ``Retry-After`` if given); any other
    5xx may come after Exchange did the work (a gateway that gave up waiting), so a send it answers is
    a lost answer (looked for in Sent Items, never simply resent).
    """
    from exchangelib.errors import EWSError

    answer: _HttpAnswer | None = getattr(_answers, "ews", None)
    if answer is None or answer.soap or not isinstance(e, EWSError):
        return None
    status, retry_after = answer.status, _retry_after(answer.headers)
    if status == 401:
        return AuthenticationFailed("EWS refused the credentials (HTTP 401)")
    # A 503, with or without Retry-After, is a server refusing work it has not begun (IIS answers so
    # while Exchange's application pool recycles or is stopped): resent, not a lost answer, or an
    # Exchange restart would fail every message sent meanwhile for good.
    if status in (429, 503):
        return ExchangeTransientError(f"EWS answered HTTP {status}: throttled or unavailable",
                                      reason="throttled" if status == 429 else "server_busy", code=f"HTTP{status}",
                                      retry_after=retry_after)
    if status >= 500:
        return _after_write(ExchangeTransientError(
            f"EWS answered HTTP {status} with no EWS answer (a gateway's page?): the request may have been "
            "carried out", reason="protocol_error", code=f"HTTP{status}", retry_after=retry_after))
    return None


def _probe_refusal(e: BaseException) -> Exception | None:
    """The error response under a failed version probe: exchangelib raises ``TransportError("No valid
    version headers found in response (ErrorImpersonateUserDenied(...))")`` with Exchange's own error
    (the mailbox may not be impersonated, does not exist) as its context."""
    from exchangelib.errors import ResponseMessageError, TransportError

    if not isinstance(e, TransportError) or isinstance(e, ResponseMessageError):
        return None
    return next((c for c in _causes(e)[1:] if isinstance(c, ResponseMessageError)), None)


def _causes(e: BaseException) -> list[BaseException]:
    """``e`` and every exception it wraps: cause, context, and those requests and urllib3 keep in
    ``args`` or ``reason``."""
    found: list[BaseException] = []
    pending: list[object] = [e]
    while pending and len(found) < 32:
        c = pending.pop(0)
        if not isinstance(c, BaseException) or any(c is f for f in found):
            continue
        found.append(c)
        pending += [c.__cause__, c.__context__, getattr(c, "reason", None), *c.args]
    return found


# -------------------------------------------------------------------------------------------- Graph


class GraphTransport:
    """Sends through Microsoft Graph ``sendMail`` with app-only tokens (``Mail.Send`` application permission)."""

    def __init__(self, *, graph_url: str = "https://graph.microsoft.com/v1.0", token_url: str, client_id: str,
                 client_secret: str, verify_tls: bool | str = True, max_connections: int = 10,
                 timeout: float = 30.0, scope: str = "https://graph.microsoft.com/.default",
                 sent_items_window: float | None = None, call_timeout: float | None = None,
                 upload_budget: int = GRAPH_UPLOAD_BUDGET, upload_window: float = GRAPH_UPLOAD_WINDOW,
                 upload_wait_limit: float = GRAPH_UPLOAD_WINDOW) -> None:
        """``timeout``: each step of an HTTP request (connect, write, each read, a pooled connection);
        ``call_timeout``: a whole call's (default ``GRAPH_TIMEOUTS_PER_CALL`` times ``timeout``), its
        wait for the mailbox's turn and upload budget left out.  ``upload_budget`` bytes of sendMail
        bodies per mailbox in any ``upload_window`` seconds (Graph's Outlook limit); a send waits at
        most ``upload_wait_limit`` seconds for room in it (the default, 5 minutes, keeps a send within
        dispatch's stop grace), then fails as a temporary failure, sent to no one."""
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if upload_budget < 1 or upload_window <= 0:
            raise ValueError("upload_budget and upload_window must be positive")
        self.graph_url = graph_url.rstrip("/")
        self.sent_items_window = SENT_ITEMS_WINDOW if sent_items_window is None else sent_items_window
        self.token_url = token_url
        self.client_id = client_id
        self._client_secret = client_secret
        self._scope = scope
        verify: ssl.SSLContext | bool
        if verify_tls is False:
            verify = False
        else:
            verify = client_context(verify_tls if isinstance(verify_tls, str) else None)
        self._client = httpx.AsyncClient(
            verify=verify, timeout=timeout, http2=False,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))
        self._token: str | None = None
        self._token_expires = 0.0  # time.monotonic() deadline
        self._token_lock = asyncio.Lock()
        self._call_timeout = GRAPH_TIMEOUTS_PER_CALL * timeout if call_timeout is None else call_timeout
        # Mailbox -> (its requests' gate, how many wait for it or hold it): dropped when unused.
        self._mailboxes: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}
        # Mailbox -> its uploads of the last ``upload_window`` seconds: forgotten once idle that long.
        self._uploads: dict[str, _UploadWindow] = {}
        self._upload_budget = upload_budget
        self._upload_window = upload_window
        self._upload_wait_limit = upload_wait_limit
        self._uploads_swept = time.monotonic()

    async def send(self, mailbox_address: str, message: bytes) -> str | None:
        """Send ``message`` (MIME) as ``mailbox_address``; Graph saves a copy in its Sent Items.

        An error answer after which Exchange Online may have sent it anyway (``_graph_may_have_sent``)
        returns normally if the message is in Sent Items after all (``_resolve_failed_send``), with a
        sentence saying so; None after a plain 202.
        """
        _check_address(mailbox_address)
        message_id = _message_id(message)
        body = base64.b64encode(bytes(message))
        if len(body) > GRAPH_MAX_REQUEST_BYTES:
            raise ExchangePermanentError(
                f"the message is {len(message)} bytes; Graph sendMail takes at most 4 MB of base64 MIME",
                code="RequestEntityTooLarge", reason="message_too_large")
        url = f"{self.graph_url}/users/{quote(mailbox_address, safe='@')}/sendMail"
        progress = _Progress()
        # Room in the upload budget first, then one of the 4 places: a send waiting for the budget
        # holds no place, so the mailbox's look-ups (and its sends that fit) go on meanwhile.
        async with self._upload_room(mailbox_address, len(body), progress), self._mailbox_turn(mailbox_address):
            response = await self._call("POST", url, progress, content=body, headers={"Content-Type": "text/plain"})
        if response.status_code == 202:
            return None
        error = _graph_error(response, "sendMail")
        if not _graph_may_have_sent(response):
            raise error
        return await self._resolve_failed_send(mailbox_address, message_id, error)

    async def _resolve_failed_send(self, mailbox_address: str, message_id: str, error: Exception) -> str:
        """``sendMail`` failed with ``error`` after which the message may have gone out: return if it is in
        Sent Items, raise (a retry sends it again) only once a look-up answered that it is not there.

        Looked up at once, then after pauses that double from ``SENT_ITEMS_FIRST_PAUSE`` until
        ``sent_items_window`` has passed.  If the last look-up failed too, nothing says it did not go:
        ``error`` is raised with ``request_sent``, which the caller resolves as a lost answer (looked
        for again, never sent again).
        """
        started, pause = time.monotonic(), SENT_ITEMS_FIRST_PAUSE
        while True:
            try:
                if await self.find_sent(mailbox_address, message_id):
                    log.warning("Graph sendMail failed (%s) but the message is in Sent Items: it was sent",
                                getattr(error, "code", type(error).__name__))
                    return f"found in the mailbox's Sent Items after sendMail answered: {error}"
                failed: ConduitError | None = None
            except ConduitError as exc:
                failed = exc
            left = started + self.sent_items_window - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(min(pause, left))
            pause *= 2
        looked = time.monotonic() - started
        if failed is not None:
            error.request_sent = True  # type: ignore[attr-defined]
            log.warning("Graph sendMail failed (%s) and Sent Items could not be searched (%s)",
                        getattr(error, "code", type(error).__name__), type(failed).__name__)
            raise error
        raise ExchangeTransientError(
            f"{error}; not in the mailbox's Sent Items after {looked:.1f} s, so it may be sent again",
            reason=getattr(error, "reason", None), code=getattr(error, "code", None),
            retry_after=getattr(error, "retry_after", None)) from None

    async def find_sent(self, mailbox_address: str, message_id: str) -> bool:
        """Whether the mailbox's Sent Items holds a message with this ``Message-ID`` (with its angle
        brackets): ``GET .../mailFolders/sentitems/messages?$filter=internetMessageId eq '<id>'``
        (needs Mail.ReadBasic or more).  Resolves a send whose outcome was lost."""
        _check_address(mailbox_address)
        url = f"{self.graph_url}/users/{quote(mailbox_address, safe='@')}/mailFolders/sentitems/messages"
        literal = message_id.replace("'", "''")
        async with self._mailbox_turn(mailbox_address):
            response = await self._call("GET", url, _Progress(),
                                        params={"$filter": f"internetMessageId eq '{literal}'", "$select": "id",
                                                "$top": "1"})
        if response.status_code != 200:
            raise _graph_error(response, "messages")
        try:
            return bool(response.json().get("value"))
        except (ValueError, AttributeError):
            raise ExchangeTransientError("Graph answered the Sent Items look-up without JSON",
                                         reason="protocol_error") from None

    async def check(self, mailbox_address: str) -> None:
        """Test & Enable: get a token and read one message id from the mailbox (needs Mail.ReadBasic or more)."""
        _check_address(mailbox_address)
        url = f"{self.graph_url}/users/{quote(mailbox_address, safe='@')}/mailFolders/inbox/messages"
        response = await self._call("GET", url, _Progress(), params={"$top": "1", "$select": "id"})
        if response.status_code != 200:
            raise _graph_error(response, "messages")

    async def close(self) -> None:
        await self._client.aclose()

    # -- HTTP and tokens

    @contextlib.asynccontextmanager
    async def _mailbox_turn(self, mailbox_address: str) -> AsyncIterator[None]:
        """One of the mailbox's ``GRAPH_MAILBOX_CONCURRENCY`` requests at once: a profile's connections
        may be more, and Graph counts per mailbox."""
        key = mailbox_address.lower()
        gate, users = self._mailboxes.setdefault(key, (asyncio.Semaphore(GRAPH_MAILBOX_CONCURRENCY), [0]))
        users[0] += 1
        try:
            async with gate:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._mailboxes[key]

    @contextlib.asynccontextmanager
    async def _upload_room(self, mailbox_address: str, size: int, progress: _Progress) -> AsyncIterator[None]:
        """Room for ``size`` bytes in the mailbox's upload budget: wait (in turn, first come first
        served) until its uploads of the last ``upload_window`` seconds leave room, then hold it until
        the call ends, when the bytes really written (once per attempt that began to go out, none for
        one that never did) are counted from that moment.  A message over the whole budget goes alone,
        once the window is empty (Graph's 4 MB per request refuses larger ones before they get here).
        """
        now = time.monotonic()
        if now - self._uploads_swept >= self._upload_window / 10:   # not a walk over them all at every send
            self._uploads_swept = now
            for key in [k for k, w in self._uploads.items() if w.idle(now)]:
                del self._uploads[key]
        key = mailbox_address.lower()
        window = self._uploads.get(key)
        if window is None:
            window = self._uploads[key] = _UploadWindow(self._upload_budget, self._upload_window)
        window.users += 1
        try:
            try:
                async with asyncio.timeout(self._upload_wait_limit):
                    await window.reserve(size)
            except TimeoutError:
                wait = window.room_in(size, time.monotonic())
                raise ExchangeTransientError(
                    f"the mailbox's Graph upload budget ({self._upload_budget} bytes in {self._upload_window:g} s) "
                    f"had no room for {size} bytes within {self._upload_wait_limit:g} s; not sent",
                    reason="upload_budget", retry_after=wait) from None
            try:
                yield
            finally:
                window.settle(size, size * progress.writes, time.monotonic())
        finally:
            window.users -= 1

    async def _call(self, method: str, url: str, progress: _Progress, **kwargs: Any) -> httpx.Response:
        """One Graph call, token included, bounded as a whole by ``call_timeout``; ``progress`` says how
        far it got, which decides what a call given up on may have done."""
        bound = asyncio.timeout(self._call_timeout)
        try:
            async with bound:
                token = await self._access_token()
                response = await self._request(method, url, token, progress, **kwargs)
                if response.status_code == 401:
                    # A cached token can be revoked or expire early; one fresh token, then the answer is final.
                    self._forget_token(token)
                    progress.stage = "token"
                    response = await self._request(method, url, await self._access_token(), progress, **kwargs)
                return response
        except TimeoutError:
            if not bound.expired():
                raise
            raise self._given_up(method, progress) from None

    def _given_up(self, method: str, progress: _Progress) -> ProtocolTimeout:
        """The error of a call not finished within ``call_timeout``, by how far it got."""
        within = f"within {self._call_timeout:g} s"
        if progress.stage == "written":
            # The request went out, or began to: Graph may have acted on it.  A POST's outcome is
            # unknown (looked for in Sent Items, never simply resent); a GET changed nothing.
            error = _after_write(ProtocolTimeout(f"Graph did not finish answering {within}"))
            error.request_sent = method == "POST"  # type: ignore[attr-defined]
            return error
        if progress.stage == "queued":
            # Waiting for one of this transport's own connections: Conduit's congestion, not the
            # server's fault (no back-off of the mailbox), and certainly not sent.
            error = _after_write(ProtocolTimeout(f"the Graph request did not start {within}: every connection "
                                                 "was busy", reason="transport_busy"), False)
        else:
            # The token endpoint, or the connection to Graph, did not get anywhere: nothing was sent.
            error = _after_write(ProtocolTimeout(f"the Graph request was not sent {within}: the "
                                                 f"{'token endpoint' if progress.stage == 'token' else 'server'} "
                                                 "did not answer in time"), False)
        error.request_sent = False  # type: ignore[attr-defined]
        return error

    async def _request(self, method: str, url: str, token: str, progress: _Progress, **kwargs: Any) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {token}"}
        progress.stage = "queued"

        async def trace(event: str, info: Mapping[str, Any]) -> None:
            # httpcore's steps of this request: a connection opened for it, then its headers written.
            if event.endswith("connect_tcp.started") and progress.stage == "queued":
                progress.stage = "connecting"
            elif event.endswith("send_request_headers.started"):
                progress.stage = "written"
                progress.writes += 1

        try:
            return await self._http(self._client.request(method, url, headers=headers, extensions={"trace": trace},
                                                         **kwargs), "Graph")
        except (ProtocolTimeout, ConnectionFailed) as exc:
            # Written but unanswered: a POST may have been acted on (its outcome is unknown); a GET
            # changed nothing and may simply be asked again.
            exc.request_sent = method == "POST" and getattr(exc, "after_write", False)  # type: ignore[attr-defined]
            raise

    async def _access_token(self) -> str:
        async with self._token_lock:
            if self._token is not None and time.monotonic() < self._token_expires - TOKEN_RENEW_MARGIN:
                return self._token
            response = await self._http(self._client.post(self.token_url, data={
                "grant_type": "client_credentials", "client_id": self.client_id,
                "client_secret": self._client_secret, "scope": self._scope}), "token endpoint")
            if response.status_code != 200:
                raise _token_error(response, self._client_secret)
            try:
                payload = response.json()
                token, lifetime = str(payload["access_token"]), float(payload.get("expires_in", 3599))
            except (ValueError, KeyError, TypeError):
                raise ExchangeTransientError("the token endpoint answered without an access token",
                                             reason="protocol_error") from None
            self._token, self._token_expires = token, time.monotonic() + lifetime
            return token

    def _forget_token(self, token: str) -> None:
        if self._token == token:
            self._token = None

    @staticmethod
    async def _http(request: Any, peer: str) -> httpx.Response:
        try:
            return await request
        except httpx.ConnectError as e:  # refused, unresolvable, TLS handshake: nothing was written
            if _is_tls_failure(e):
                raise TlsFailed(f"TLS with the {peer} failed: certificate not trusted or handshake refused") from None
            raise ConnectionFailed(f"could not reach the {peer}") from None
        except httpx.TimeoutException as e:
            if isinstance(e, httpx.PoolTimeout):
                # No connection of the transport's own came free: Conduit's congestion, nothing sent.
                raise _after_write(ProtocolTimeout(f"no connection to the {peer} came free in time",
                                                   reason="transport_busy"), False) from None
            # Connect timeouts come before the request is written; read and write ones after (some of) it was.
            raise _after_write(ProtocolTimeout(f"the {peer} did not answer in time"),
                               isinstance(e, (httpx.ReadTimeout, httpx.WriteTimeout))) from None
        except (httpx.ProxyError, httpx.UnsupportedProtocol) as e:  # no connection to the server itself
            raise ConnectionFailed(f"could not reach the {peer} ({type(e).__name__})") from None
        except httpx.TransportError as e:
            # ReadError, RemoteProtocolError (closed without an answer), WriteError: the request was
            # written, or partly (httpcore goes on to read an answer after a failed write), and the
            # server may have acted on it.
            raise _after_write(ConnectionFailed(
                f"the connection to the {peer} dropped after the request was sent ({type(e).__name__})")) from None


@dataclass
class _Progress:
    """How far one Graph call got: ``token`` (getting a token), ``queued`` (its request waiting for a
    connection of the transport's pool), ``connecting``, ``written`` (its request began to go out);
    ``writes``: how many of its requests began to go out (a 401 sends the request a second time)."""

    stage: str = "token"
    writes: int = 0


class _UploadWindow:
    """One mailbox's sendMail uploads in the last ``period`` seconds, against Graph's ``budget``.

    ``reserve`` waits, in turn, for room and holds it (``pending``) until ``settle`` counts what was
    really written, as of the moment the call ended: later than Graph saw the bytes arrive, so the
    window here empties no earlier than Graph's does.
    """

    def __init__(self, budget: int, period: float) -> None:
        self.budget = budget
        self.period = period
        self.uploads: deque[tuple[float, int]] = deque()   # (when the call ended, bytes), oldest first
        self.counted = 0     # the bytes in ``uploads``
        self.pending = 0     # held by calls under way
        self.users = 0       # calls waiting for room or holding it
        self._turn = asyncio.Lock()       # first come, first served: a large message is not overtaken for ever
        self._changed = asyncio.Event()   # a call ended: room may have come sooner than the window says

    async def reserve(self, size: int) -> None:
        async with self._turn:
            while (wait := self.room_in(size, time.monotonic())) > 0:
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._changed.wait()
            self.pending += size

    def settle(self, size: int, written: int, now: float) -> None:
        self.pending -= size
        if written:
            self.uploads.append((now, written))
            self.counted += written
        self._changed.set()

    def room_in(self, size: int, now: float) -> float:
        """Seconds until ``size`` more bytes fit, if nothing else is sent meanwhile (0: they fit now).
        Bytes held by calls under way count as if written now."""
        self._forget(now)
        used = self.counted + self.pending
        excess = used if size > self.budget else used + size - self.budget   # a message over the budget goes alone
        if excess <= 0:
            return 0.0
        freed = 0
        for at, written in self.uploads:
            freed += written
            if freed >= excess:
                return at + self.period - now
        return self.period

    def idle(self, now: float) -> bool:
        """Nothing sent in the last ``period`` seconds and nobody sending: nothing left to remember."""
        self._forget(now)
        return not self.uploads and not self.users

    def _forget(self, now: float) -> None:
        while self.uploads and self.uploads[0][0] <= now - self.period:
            self.counted -= self.uploads.popleft()[1]


def _is_tls_failure(e: BaseException) -> bool:
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """A ``Retry-After`` header in seconds (either form), from httpx's or requests' headers."""
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:  # the HTTP-date form
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def _graph_may_have_sent(response: httpx.Response) -> bool:
    """Whether Exchange Online may have sent a message although Graph answered ``sendMail`` with this error.

    Graph documents three answers as a request refused before any work, to be repeated later (as for
    any 4xx, nothing was sent): 429, throttling ("Microsoft Graph returns HTTP status code 429 (Too
    many requests), and the requests fail", https://learn.microsoft.com/graph/throttling); 509 ("Your
    app has been throttled for exceeding the maximum bandwidth cap"); and 503 with a Retry-After ("The
    service is temporarily unavailable for maintenance or is overloaded. You may repeat the request
    after a delay, the length of which may be specified in a Retry-After header"; both
    https://learn.microsoft.com/graph/errors).  Every other 5xx can come after the work was done: 500
    ("an internal server error while processing the request"), and 502, 504 ("did not receive a timely
    response from the upstream server it needed to access in attempting to complete the request") or a
    503 without Retry-After from a gateway whose upstream went on.
    """
    status = response.status_code
    if status < 500 or status == 509:
        return False
    return not (status == 503 and response.headers.get("Retry-After"))


def _graph_error(response: httpx.Response, action: str) -> Exception:
    code, message = f"HTTP{response.status_code}", response.reason_phrase
    try:
        err = response.json().get("error") or {}
        code, message = str(err.get("code") or code), str(err.get("message") or message)
    except (ValueError, AttributeError):
        pass
    status = response.status_code
    if status == 401:
        return AuthenticationFailed(f"Graph refused the access token ({code})")
    if status == 413:  # "Submission attempts that exceed this limit will result in an HTTP 413"
        return ExchangePermanentError(f"Graph {action}: 413 {code}: {message}", code=code, reason="message_too_large")
    if status in (429, 503, 504) or status >= 500:
        return ExchangeTransientError(f"Graph {action}: {status} {code}: {message}", reason="throttled"
                                      if status == 429 else "server_busy", code=code,
                                      retry_after=_retry_after(response.headers))
    return ExchangePermanentError(f"Graph {action}: {status} {code}: {message}", code=code)


def _token_error(response: httpx.Response, secret: str) -> Exception:
    code, description = f"HTTP{response.status_code}", response.reason_phrase
    try:
        payload = response.json()
        if _ERROR_CODE.fullmatch(str(payload.get("error"))):
            code = str(payload["error"])
        # The first line of an AADSTS description names the problem.  Azure AD never repeats the
        # secret, but a gateway or another identity provider may echo the form it was sent.
        description = _redacted(str(payload.get("error_description") or description).splitlines()[0], secret)[:300]
    except (ValueError, AttributeError, IndexError):
        pass
    if _busy_status(response.status_code):
        return _token_endpoint_busy(response.status_code, code, _retry_after(response.headers))
    if code in ("invalid_client", "unauthorized_client", "invalid_grant", "invalid_tenant") or \
            response.status_code == 401:
        return AuthenticationFailed(f"the token endpoint refused the app: {code}: {description}")
    return ExchangePermanentError(f"token endpoint: {response.status_code} {code}: {description}", code=code)
