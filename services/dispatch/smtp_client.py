"""One SMTP client session: the lean send path of the dispatch service.

Why not aiosmtplib for sending: it waits for a reply after every command (MAIL, each RCPT, DATA,
the content: four round trips and four wake-ups per message), parses every address with
``email.utils`` and wraps every read in ``asyncio.wait_for``.  ``bench/smtp_send.py`` keeps the
numbers.  This module speaks just the part of SMTP that dispatch needs, over an
``asyncio.Protocol``: with RFC 2920 PIPELINING, MAIL FROM, every RCPT TO and DATA leave in one
write and their replies are read in order, then the dot-stuffed content leaves in a second write
(in pieces when it is large), together with the next message's envelope when one is waiting
(``finish``).

Two waits: ``timeout`` for every reply but one, and for progress while content is written;
``data_timeout`` for the reply to the final dot, which RFC 5321 4.5.3.2.6 sets at 10 minutes
because servers scan the content before they answer.

The failure classes here are precise because the caller's send ledger acts on them:

- ``SmtpTemporaryFailure`` (4xx) and ``SmtpPermanentFailure`` (5xx) carry the server's reply;
- ``SmtpOutcomeUnknown``: the final dot was handed to the connection but no reply came back (the
  server may have accepted the message), so nobody may resend it blindly;
- ``ConnectionFailed`` from ``finish`` with reason ``connection_lost_mid_message``: the session
  ended (the server closed it, or stopped reading and we gave up) while the end of the message was
  provably never written or still in our own buffers: nothing was accepted;
- ``ConnectionFailed``, ``ProtocolTimeout``, ``AuthenticationFailed``, ``TlsFailed`` from
  ``shared.errors``.

Nothing here ever logs or puts into an exception a password, a token or a message body.  What the
server says is cleaned where it is decoded (``server_text``): it ends up in exceptions, logs,
PostgreSQL ``text`` columns and JSON status events, which must never see a NUL.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import logging
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from shared.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    InvalidInput,
    PermanentError,
    ProtocolTimeout,
    TlsFailed,
    TransientError,
)
from shared.registry.models import TlsMode

log = logging.getLogger(__name__)

AuthMechanism = Literal["plain", "login", "xoauth2"]

# A reply line longer than this means the peer is not an SMTP server (RFC 5321 4.5.3.1.5: 512).
_MAX_LINE = 16 * 1024
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s")

# What is kept of a server's text: per line, and per reply (its lines joined).  RFC 5321 4.5.3.1.5
# allows 512 octets a reply line; anything past this is noise and would bloat ledger rows.
_MAX_REPLY_TEXT = 1000
# More continuation lines than this are dropped (a hostile server could otherwise grow one reply
# without end); the longest real EHLO replies have a few dozen.
_MAX_REPLY_LINES = 100
# C0 controls but tab, DEL and C1 controls: PostgreSQL refuses NUL in ``text`` and the others
# garble logs and terminals.
_UNPRINTABLE = dict.fromkeys(
    (*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F, *range(0x80, 0xA0)), "\ufffd"
)
# TLS flow control counts encrypted bytes; each record of up to 16 KiB of text carries well under
# 512 bytes of header, MAC or tag and padding (3 %), and a short write makes a short record.  See
# ``SmtpConnection._content_lost``.
_TLS_RECORD_SLACK = 4096
# Content larger than this is written in pieces of this size, each once the transport has taken in
# the ones before (``SmtpConnection._write_content``).  Over TLS that is what lets a stalled server
# be seen: asyncio's SSL layer passes a whole write on at once and pauses us only for what it holds
# itself.  Nearly every message is smaller and still leaves in one write.
_CONTENT_PIECE = 256 * 1024


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SmtpServer:
    """Where to deliver.  ``ssl_context=None`` with TLS means a verifying default context."""

    host: str
    port: int
    tls: TlsMode
    ssl_context: ssl.SSLContext | None = None

    def tls_context(self) -> ssl.SSLContext:
        return self.ssl_context if self.ssl_context is not None else ssl.create_default_context()


@dataclass(frozen=True)
class SmtpCredentials:
    """A login.  ``secret`` is a password (plain, login) or an OAuth 2.0 access token (xoauth2)."""

    username: str
    secret: str = field(repr=False)
    mechanism: AuthMechanism = "plain"


@dataclass(frozen=True)
class SmtpAccepted:
    """The server took responsibility for the message (its reply to the final dot)."""

    code: int
    text: str
    refused_recipients: dict[str, tuple[int, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PreparedMessage:
    """A message checked and encoded for one session: its envelope commands and its content."""

    recipients: tuple[str, ...]
    envelope: list[bytes]
    content: bytes


@dataclass(frozen=True, slots=True)
class OpenTransaction:
    """A transaction whose envelope the server accepted: it waits for its content."""

    content: bytes
    refused: dict[str, tuple[int, str]]


# --------------------------------------------------------------------------- failures


class _SmtpReplyError:
    """Mixin: the server's reply (code, enhanced status code, text) and per-recipient refusals."""

    def _init_reply(
        self,
        code: int,
        text: str,
        enhanced: str | None,
        refused_recipients: dict[str, tuple[int, str]] | None,
    ) -> None:
        self.code = code
        self.text = text
        self.enhanced = enhanced if enhanced is not None else _enhanced_code(text)
        self.refused_recipients = dict(refused_recipients or {})


class SmtpTemporaryFailure(TransientError, _SmtpReplyError):
    """The server answered 4xx: try again later."""

    reason = "smtp_temporary"

    def __init__(
        self,
        code: int,
        text: str,
        *,
        enhanced: str | None = None,
        refused_recipients: dict[str, tuple[int, str]] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(f"SMTP {code} {text}", reason=reason)
        self._init_reply(code, text, enhanced, refused_recipients)


class SmtpPermanentFailure(PermanentError, _SmtpReplyError):
    """The server answered 5xx, or the message cannot be sent to this server as it stands."""

    reason = "smtp_permanent"

    def __init__(
        self,
        code: int,
        text: str,
        *,
        enhanced: str | None = None,
        refused_recipients: dict[str, tuple[int, str]] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(f"SMTP {code} {text}", reason=reason)
        self._init_reply(code, text, enhanced, refused_recipients)


class SmtpOutcomeUnknown(TransientError):
    """The content and its final dot were sent but no reply arrived: the server may have accepted.

    Never retried inside the transport; the caller's send ledger decides.
    """

    reason = "smtp_outcome_unknown"


class StaleConnection(ConnectionFailed):
    """The connection was already dead when a transaction began: nothing of it reached the server.

    The pool retries such a send once on a fresh connection; see ``SmtpPool.send``.
    """

    reason = "connection_failed"


def _not_sent(following: PreparedMessage | None, cause: Exception) -> StaleConnection | None:
    """The fate of a following message whose session ended before its envelope was answered:
    its content never left, so it may be sent on another session."""
    if following is None:
        return None
    return StaleConnection(f"the session ended before the next message's envelope was answered: {cause}")


def server_text(raw: bytes) -> str:
    """Text a server sent, safe to keep anywhere: invalid UTF-8 and control characters (but tab)
    replaced by U+FFFD, at most ``_MAX_REPLY_TEXT`` characters.

    On the send path for every reply line, so the usual case (printable ASCII) costs what the
    plain decode did plus two C-level checks.
    """
    if raw.isascii():
        text = raw.decode("ascii")
        if text.isprintable():  # for ASCII: 0x20-0x7E only
            return text if len(text) <= _MAX_REPLY_TEXT else _truncated(text)
    else:
        text = raw.decode("utf-8", "replace")
    text = text.translate(_UNPRINTABLE)
    return text if len(text) <= _MAX_REPLY_TEXT else _truncated(text)


def _truncated(text: str) -> str:
    return text[: _MAX_REPLY_TEXT - 1] + "\u2026"


def _enhanced_code(text: str) -> str | None:
    match = _ENHANCED.match(text)
    return match.group(1) if match else None


def recipient_deferred(code: int, text: str) -> bool:
    """Whether a refusal of one recipient asks to try that recipient again later: a 4xx (RFC 5321
    4.2.5), or a 552 that is RFC 821's "too many recipients" (4.5.3.1.10: treat it as the 452 it
    should be), i.e. one whose enhanced code, if any, is X.5.3.  A 552 "mailbox full" (5.2.2) is not."""
    if 400 <= code < 500:
        return True
    if code != 552:
        return False
    enhanced = _enhanced_code(text)
    return enhanced is None or enhanced.endswith(".5.3")


def reply_failure(reply: SmtpReply, **extra) -> SmtpTemporaryFailure | SmtpPermanentFailure:
    """The failure class a non-success reply calls for: 4xx temporary, anything else permanent."""
    cls = SmtpTemporaryFailure if 400 <= reply.code < 500 else SmtpPermanentFailure
    return cls(reply.code, reply.text, **extra)


# --------------------------------------------------------------------------- wire format


@dataclass(frozen=True, slots=True)
class SmtpReply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The reply's lines joined (each already clean, see ``server_text``), capped as a whole."""
        text = " ".join(self.lines)
        return text if len(text) <= _MAX_REPLY_TEXT else _truncated(text)


def encode_content(message: bytes) -> bytes:
    """The DATA payload: CRLF line endings, dot-stuffed (RFC 5321 4.5.2), ending in CRLF.CRLF.

    bytes.replace runs in C, which is why this is a chain of replaces and not a regex.
    Bare CR and bare LF both become CRLF: RFC 5321 2.3.8 forbids them on the wire.
    """
    data = message.replace(b"\r\n", b"\n")
    if b"\r" in data:
        data = data.replace(b"\r", b"\n")
    data = data.replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


def _message_size(content: bytes) -> int:
    """The SIZE of DATA's payload (RFC 1870 4): its octets with CRLFs, without the stuffed dots
    or the final ".CRLF"."""
    return len(content) - 3 - content.count(b"\r\n..") - content.startswith(b"..")


def _check_address(address: str, role: str) -> None:
    # A CR, LF or angle bracket would let an address inject SMTP commands.
    if any(ch in address for ch in "\r\n<>") or (role == "recipient" and not address):
        raise InvalidInput(f"invalid {role} address", reason="invalid_address")


def _needs_utf8(sender: str, recipients: Sequence[str]) -> bool:
    return not sender.isascii() or not all(r.isascii() for r in recipients)


def _has_8bit(data: bytes) -> bool:
    return not data.isascii()


def _header_section(message: bytes) -> bytes:
    return _BLANK_LINE.split(message, 1)[0]


# --------------------------------------------------------------------------- protocol


class _ReplyReader(asyncio.Protocol):
    """Splits the server's bytes into replies and hands them out in order.

    A reader awaiting ``n`` replies is woken once, when all ``n`` are in: one wake-up per
    pipelined group instead of one per command.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buffer = bytearray()
        self._lines: list[str] = []
        self.replies: collections.deque[SmtpReply] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 0
        self._drain_waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.close_reason: str = "connection closed by the server"
        # Flow control as the transport reported it: while paused, more than ``low_water`` bytes
        # written were still in the transport's own buffer (see ``SmtpConnection._content_lost``).
        self.writing_paused = False
        self.low_water = 0

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buf[start:end]).rstrip(b"\r")
            start = end + 1
            self._line_received(line)
        if start:
            del buf[:start]
        if len(buf) > _MAX_LINE:
            self._fail("the server sent an over-long reply line")
            return
        self._wake_if_ready()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is not None:
            self.close_reason = f"connection lost: {exc.__class__.__name__}"
        self._wake(ConnectionFailed(self.close_reason))
        # Wake a writer waiting for room without an error: the ``read`` that follows every drain
        # hands out a reply the server sent before it closed (a 552 or 421 in the middle of DATA),
        # or raises the loss when there is none.  ``writing_paused`` stays as it was: a transport
        # that loses its connection drops its buffer and never resumes its protocol.
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.transport is not None:
            self.low_water = self.transport.get_write_buffer_limits()[0]
        if self._drain_waiter is None or self._drain_waiter.done():
            self._drain_waiter = self._loop.create_future()

    def resume_writing(self) -> None:
        self.writing_paused = False
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)

    @property
    def pending(self) -> bool:
        """Bytes of the server's not yet handed out: whole replies, or part of one."""
        return bool(self.replies or self._lines or self._buffer)

    # parsing

    def _line_received(self, raw: bytes) -> None:
        code = raw[:3]
        if len(code) < 3 or not code.isdigit():  # bytes.isdigit: ASCII digits only
            self._fail("the server sent a malformed reply")
            return
        if len(self._lines) < _MAX_REPLY_LINES:
            self._lines.append(server_text(raw[4:]))
        if raw[3:4] != b"-":
            self.replies.append(SmtpReply(int(code), tuple(self._lines)))
            self._lines = []

    def _fail(self, why: str) -> None:
        self.close_reason = why
        if self.transport is not None:
            self.transport.abort()
        self._wake(ConnectionFailed(why))

    # waiting

    def _wake_if_ready(self) -> None:
        if self._waiter is not None and len(self.replies) >= self._wanted:
            self._wake(None)

    def _wake(self, exc: Exception | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)

    async def read(self, count: int, timeout: float) -> list[SmtpReply]:
        """The next ``count`` replies, in order."""
        if len(self.replies) < count:
            if self.closed:
                raise ConnectionFailed(self.close_reason)
            waiter = self._loop.create_future()
            self._waiter, self._wanted = waiter, count
            timer = self._loop.call_later(timeout, self._expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
        return [self.replies.popleft() for _ in range(count)]

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(ProtocolTimeout("the SMTP server did not reply in time"))
        if self._waiter is waiter:
            self._waiter = None

    async def drain(self, timeout: float) -> None:
        """Wait until the transport takes writes again: at once unless it paused us.

        A progress timeout, not a total one: a big message over a slow link may take longer than
        ``timeout`` to leave, so this fails only when the transport's buffer has not shrunk for
        ``timeout`` seconds, i.e. the server is alive but has stopped reading (its receive window
        full: an overloaded or stalled MTA).  Without it such a server holds the send for ever.
        The protocol is still paused when this raises: see ``SmtpConnection._content_lost``.
        """
        drain = self._drain_waiter
        if drain is None or drain.done():
            return  # the usual case: no timer, no task, as cheap as before
        transport = self.transport
        assert transport is not None  # a paused protocol has a transport
        unsent = transport.get_write_buffer_size()
        while True:
            # ``asyncio.wait`` leaves the shared waiter alone on expiry (``wait_for`` would cancel it).
            done, _ = await asyncio.wait((drain,), timeout=timeout)
            if done:
                return
            before, unsent = unsent, transport.get_write_buffer_size()
            if unsent >= before:
                raise ProtocolTimeout(
                    f"the SMTP server stopped reading the message: {unsent} bytes of it still "
                    f"unsent, none taken in {timeout:g} s"
                )


# --------------------------------------------------------------------------- session


class SmtpConnection:
    """A logged-in SMTP session that sends messages one after another.

    Not safe for concurrent use: the pool hands each connection to one sender at a time.
    """

    def __init__(
        self, server: SmtpServer, *, helo_name: str, timeout: float, data_timeout: float | None = None
    ) -> None:
        self.server = server
        self.helo_name = helo_name
        self.timeout = timeout
        # The wait for the verdict on a message, once its final dot is written (RFC 5321
        # 4.5.3.2.6); None: ``timeout``.
        self.data_timeout = timeout if data_timeout is None else data_timeout
        self.extensions: dict[str, str] = {}
        self.messages_sent = 0
        self._may_be_stale = False
        self._reader: _ReplyReader | None = None
        self._broken = False

    # -- lifecycle

    @property
    def usable(self) -> bool:
        """False once the server closed, spoke out of turn (a 421 while idle) or a send broke it."""
        reader = self._reader
        return (
            reader is not None and not reader.closed and not reader.replies and not self._broken
        )

    async def open(self, credentials: SmtpCredentials | None) -> None:
        """Connect, read the greeting, EHLO (HELO fallback), STARTTLS, AUTH."""
        try:
            await self._connect()
            greeting = await self._read_one()
            if greeting.code != 220:
                raise reply_failure(greeting, reason="smtp_greeting_refused")
            await self._hello()
            if self.server.tls == "starttls":
                await self._starttls()
            if credentials is not None:
                await self._authenticate(credentials)
            reader = self._require_reader()
            if reader.pending:
                # A reply nobody asked for (a doubled greeting, an extra line after EHLO's): every
                # later reply would be read one command late.
                raise ConnectionFailed("the SMTP server sent a reply nobody asked for while the session opened")
            if not self.usable:
                raise ConnectionFailed(reader.close_reason)
        except BaseException:
            self.abort()
            raise

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        server = self.server
        tls = server.tls_context() if server.tls == "implicit" else None
        try:
            async with asyncio.timeout(self.timeout):
                _, reader = await loop.create_connection(
                    lambda: _ReplyReader(loop),
                    server.host,
                    server.port,
                    ssl=tls,
                    server_hostname=server.host if tls else None,
                    ssl_handshake_timeout=self.timeout if tls else None,
                )
        except TimeoutError:
            raise ProtocolTimeout(f"connecting to {server.host}:{server.port} timed out") from None
        except ssl.SSLError as exc:
            raise TlsFailed(f"TLS with {server.host}:{server.port} failed: {_tls_reason(exc)}") from None
        except OSError as exc:
            raise ConnectionFailed(
                f"cannot connect to {server.host}:{server.port}: {exc.strerror or exc}"
            ) from None
        self._reader = reader

    async def _hello(self) -> None:
        reply = await self.command(f"EHLO {self.helo_name}")
        if reply.code == 250:
            self.extensions = _parse_ehlo(reply)
            return
        if reply.code == 421:
            raise reply_failure(reply)
        reply = await self.command(f"HELO {self.helo_name}")  # pre-ESMTP server (RFC 5321 3.2)
        if reply.code != 250:
            raise reply_failure(reply, reason="smtp_helo_refused")
        self.extensions = {}

    async def _starttls(self) -> None:
        if "STARTTLS" not in self.extensions:
            raise TlsFailed(f"{self.server.host} does not offer STARTTLS", reason="starttls_unavailable")
        reply = await self.command("STARTTLS")
        if 400 <= reply.code < 500:   # 454 "TLS not available due to temporary reason" (RFC 3207 4)
            raise SmtpTemporaryFailure(reply.code, reply.text, reason="starttls_temporary")
        if reply.code != 220:
            raise TlsFailed(f"STARTTLS refused: {reply.code} {reply.text}")
        reader = self._require_reader()
        if reader.pending:
            # RFC 3207 4.2 (CVE-2011-0411): anything after the 220 came in clear, before TLS, and
            # whoever sits on the path could have written it; kept, it would be read as the server's
            # replies inside TLS (a forged acceptance of a message the server refused).
            raise TlsFailed("the server sent more after its reply to STARTTLS, in clear, before TLS began: "
                            "refused, as an attacker on the path could have written it", reason="starttls_injection")
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                reader.transport,
                reader,
                self.server.tls_context(),
                server_hostname=self.server.host,
                ssl_handshake_timeout=self.timeout,
            )
        except ssl.SSLError as exc:
            raise TlsFailed(f"TLS with {self.server.host} failed: {_tls_reason(exc)}") from None
        except (OSError, ConnectionError) as exc:
            raise ConnectionFailed(f"connection lost during STARTTLS: {exc}") from None
        except TimeoutError:
            raise ProtocolTimeout("the TLS handshake timed out") from None
        reader.transport = transport  # type: ignore[assignment]
        # RFC 3207 4.2: forget everything learnt before TLS and say EHLO again.
        await self._hello()

    async def _authenticate(self, credentials: SmtpCredentials) -> None:
        offered = self.extensions.get("AUTH", "").upper().split()
        mechanism = credentials.mechanism.upper()
        if mechanism == "PLAIN" and "PLAIN" not in offered and "LOGIN" in offered:
            mechanism = "LOGIN"  # the same password, asked for in two steps: servers that offer only LOGIN
        if mechanism not in offered:
            raise AuthenticationFailed(
                f"the server does not offer AUTH {mechanism} (offers: {' '.join(offered) or 'none'})",
                reason="auth_mechanism_unavailable",
            )
        if mechanism == "PLAIN":
            token = f"\0{credentials.username}\0{credentials.secret}"
            reply = await self.command(f"AUTH PLAIN {_b64(token)}")
        elif mechanism == "LOGIN":
            reply = await self.command("AUTH LOGIN")
            if reply.code == 334:
                reply = await self.command(_b64(credentials.username))
            if reply.code == 334:
                reply = await self.command(_b64(credentials.secret))
        else:
            token = f"user={credentials.username}\x01auth=Bearer {credentials.secret}\x01\x01"
            reply = await self.command(f"AUTH XOAUTH2 {_b64(token)}")
            if reply.code == 334:
                # The challenge is a base64 JSON error; an empty line asks for the final reply.
                detail = _decode_challenge(reply.text)
                reply = await self.command("")
                if detail:
                    reply = SmtpReply(reply.code, (*reply.lines, detail))
        _check_auth_reply(reply)

    def abort(self) -> None:
        reader = self._reader
        if reader is not None and reader.transport is not None:
            reader.transport.abort()
        self._broken = True

    async def quit(self) -> None:
        """Say goodbye politely when the connection is healthy; never raise."""
        reader = self._reader
        if reader is None or reader.transport is None:
            return
        try:
            if self.usable:
                reader.transport.write(b"QUIT\r\n")
                await reader.read(1, min(self.timeout, 5.0))
        except Exception:  # noqa: BLE001 - the session is ending anyway
            pass
        finally:
            reader.transport.close()
            self._broken = True

    # -- primitives

    def _require_reader(self) -> _ReplyReader:
        if self._reader is None or self._reader.transport is None:
            raise ConnectionFailed("not connected")
        return self._reader

    def _write(self, data: bytes) -> None:
        reader = self._require_reader()
        if reader.closed or reader.transport.is_closing():
            raise ConnectionFailed(reader.close_reason)
        reader.transport.write(data)

    async def _read_one(self) -> SmtpReply:
        return (await self._require_reader().read(1, self.timeout))[0]

    async def command(self, line: str) -> SmtpReply:
        self._write(line.encode("utf-8") + b"\r\n")
        return await self._read_one()

    # -- sending

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        may_be_stale: bool = False,
    ) -> SmtpAccepted:
        """One mail transaction on its own (``begin`` then ``finish``)."""
        opened = await self.begin(self.prepare(sender, recipients, message), may_be_stale=may_be_stale)
        accepted, _ = await self.finish(opened)
        if isinstance(accepted, BaseException):
            raise accepted
        return accepted

    def prepare(self, sender: str, recipients: Sequence[str], message: bytes) -> PreparedMessage:
        """Check and encode a message for this session; raises ``InvalidInput`` or
        ``SmtpPermanentFailure`` (too large, SMTPUTF8 needed) before anything is written."""
        content = encode_content(message)
        envelope = self._envelope_commands(sender, recipients, message, _message_size(content))
        return PreparedMessage(tuple(recipients), envelope, content)

    async def begin(self, prepared: PreparedMessage, *, may_be_stale: bool = False) -> OpenTransaction:
        """Send the envelope (MAIL, RCPT..., DATA) and read its replies: the transaction is then
        ready for its content.  Raises the refusal (the session reset for the next message).

        With ``may_be_stale`` (a session that sat idle), a session found dead before the server
        processed any of the transaction raises ``StaleConnection`` instead of failing it: the
        connection was lost before any reply, or the first reply was 421 (the server closing it,
        typically on an idle timeout that raced our write).
        """
        self._may_be_stale = may_be_stale
        try:
            if self.pipelining:
                replies = await self._pipelined(prepared.envelope)
            else:
                replies = await self._lockstep(prepared.envelope)
            return await self._opened(prepared, replies)
        except (SmtpTemporaryFailure, SmtpPermanentFailure, InvalidInput):
            raise  # the session was reset (or marked broken) on the way
        except BaseException:
            # Timeouts, lost connections, cancellation: the session state is unknown.
            self.abort()
            raise

    async def finish(
        self, transaction: OpenTransaction, following: PreparedMessage | None = None
    ) -> tuple[SmtpAccepted | Exception, OpenTransaction | Exception | None]:
        """Send the content and read the server's verdict on it.

        With ``following`` (PIPELINING only), the next message's envelope leaves in the same write
        as this content (RFC 2920 3.1: the content may start a group, DATA must end one): one write
        and one wake-up per message instead of two.  Returns this message's outcome (accepted, or
        the failure) and the following one's: open for its content, its refusal, or
        ``StaleConnection`` when the session ended before its envelope was answered (nothing of it
        was delivered, so it may go out on another session).  Never raises for a server's answer.

        While the content is written, the server taking none of it for ``timeout`` is a stall;
        once its end is written, the verdict is waited for ``data_timeout``.
        """
        if following is not None and not self.pipelining:
            raise ValueError("a following envelope needs PIPELINING")
        reader = self._require_reader()
        self._may_be_stale = False
        envelope = b"" if following is None else b"".join(following.envelope)
        try:
            stopped = await self._write_content(reader, transaction.content, envelope)
        except ConnectionFailed as exc:
            # Closed before the first write: nothing of it was handed to the connection.
            self.abort()
            return exc, _not_sent(following, exc)
        except BaseException:
            self.abort()
            raise
        if stopped is not None:
            self.abort()  # in the middle of DATA: the session cannot go on
            return self._cut_short(reader, transaction, stopped), _not_sent(following, stopped)
        try:
            await reader.drain(self.timeout)
            (reply,) = await reader.read(1, self.data_timeout)
        except (ConnectionFailed, ProtocolTimeout) as exc:
            failure = self._content_lost(reader, len(envelope), exc)
            self.abort()
            return failure, _not_sent(following, exc)
        except BaseException:
            self.abort()
            raise
        self.messages_sent += 1
        if reader.writing_paused and reply.code < 400:
            # The session ended while the end of the message was still ours to write, and the
            # server said yes to something before that: no telling what it took.  (A refusal
            # needs no such care: it is the verdict, whatever it answered.)
            self.abort()
            return SmtpOutcomeUnknown(
                f"the server answered {reply.code} before the end of the message was written, "
                "then closed; it may have accepted something"
            ), _not_sent(following, ConnectionFailed(reader.close_reason))
        if 200 <= reply.code < 300:
            outcome: SmtpAccepted | Exception = SmtpAccepted(reply.code, reply.text, transaction.refused)
        else:
            if reply.code == 421:
                self._broken = True
            outcome = reply_failure(reply, refused_recipients=transaction.refused)
        if following is None:
            return outcome, None
        if reply.code == 421:
            self.abort()  # the server is closing: whatever it says to the envelope is moot
            return outcome, _not_sent(following, ConnectionFailed(f"the server is closing the session: {reply.text}"))
        try:
            replies = await reader.read(len(following.envelope), self.timeout)
            return outcome, await self._opened(following, replies)
        except (SmtpTemporaryFailure, SmtpPermanentFailure, InvalidInput) as exc:
            return outcome, exc
        except (ConnectionFailed, ProtocolTimeout) as exc:
            self.abort()
            return outcome, _not_sent(following, exc)
        except BaseException:
            self.abort()
            raise

    async def _write_content(self, reader: _ReplyReader, content: bytes, envelope: bytes) -> Exception | None:
        """Hand the content to the transport, ``envelope`` (the following message's) right after
        it: None once all of it is written, or why it stopped before the last piece.  Raises
        ``ConnectionFailed`` when the session was closed before the first write.

        Content up to ``_CONTENT_PIECE`` is one write.  Larger content goes piece by piece, each
        after ``_ReplyReader.drain`` (a progress timeout) says the transport took in the ones
        before; it stops early when the server stopped reading, closed, or answered before the
        end.  The last piece holds the end of the final CRLF.CRLF: when it stops, the end of the
        message was never handed to the transport, TLS or not, so the server cannot have
        accepted the message.
        """
        if len(content) <= _CONTENT_PIECE:
            self._write(content + envelope)
            return None
        view = memoryview(content)
        last = (len(content) - 1) // _CONTENT_PIECE * _CONTENT_PIECE  # where the last piece starts
        self._write(view[:_CONTENT_PIECE])
        try:
            for start in range(_CONTENT_PIECE, last + 1, _CONTENT_PIECE):
                await reader.drain(self.timeout)
                if reader.closed:
                    return ConnectionFailed(reader.close_reason)
                if reader.replies:
                    return ConnectionFailed("the server answered before the end of the message")
                if start < last:
                    self._write(view[start:start + _CONTENT_PIECE])
                else:
                    self._write(b"".join((view[start:], envelope)))  # the end, and what follows it
        except (ConnectionFailed, ProtocolTimeout) as exc:
            return exc
        return None

    def _cut_short(self, reader: _ReplyReader, transaction: OpenTransaction, cause: Exception) -> Exception:
        """The outcome of a message whose end was never written (``_write_content`` stopped): the
        server's own verdict when it answered before it closed or stopped reading (a 552 or 421
        in the middle of DATA), and otherwise nothing accepted."""
        if not reader.replies:
            return ConnectionFailed(
                f"the session ended while the message was being written ({cause}); "
                "its end never left, so nothing was accepted",
                reason="connection_lost_mid_message",
            )
        reply = reader.replies.popleft()
        if reply.code < 400:
            # A yes to something before the end of the message: not "sent", not "not sent".
            return SmtpOutcomeUnknown(
                f"the server answered {reply.code} before the end of the message was written; "
                "it may have accepted something"
            )
        return reply_failure(reply, refused_recipients=transaction.refused)

    def _content_lost(self, reader: _ReplyReader, after_dot: int, cause: Exception) -> Exception:
        """The outcome of a message whose session ended, with no reply, after its content was
        handed to the transport: unknown, unless the end of the message provably never left.

        The line is the kernel: bytes handed to the socket may have been delivered, whatever
        happened next.  An asyncio transport keeps what the socket did not take in its own
        buffer; it pauses its protocol when that buffer passes the high-water mark and resumes it
        only once it is at or below the low-water mark, and on a lost connection (or our abort)
        it drops the buffer without resuming.  So a protocol still paused when the session ends
        had more than ``low_water`` bytes, the last ones written, never handed to the kernel.  The
        same holds when the server stopped reading and ``_ReplyReader.drain`` gave up: it raises
        while still paused, and the caller aborts at once, dropping that buffer unsent.  The
        content's write was the last one, ending with the final CRLF.CRLF and then only the
        following envelope (``after_dot`` bytes): if more than those were never handed over, the
        server never saw the end of the data and cannot have accepted the message.

        For the last piece of the content, that is (``_write_content`` settles the earlier ones).
        Over TLS this seldom proves anything: asyncio's SSL layer encrypts a write and passes it
        on to the socket transport at once, whose buffer we cannot see, and resumes us.  When it
        does pause us, what it holds is partly encrypted records; ``_TLS_RECORD_SLACK`` and a
        1/32 margin cover their overhead.  Anything less certain stays ``SmtpOutcomeUnknown``.
        """
        if reader.writing_paused:
            unsent = reader.low_water
            if self.server.tls != "none":
                unsent -= unsent // 32 + _TLS_RECORD_SLACK
            if unsent >= after_dot:
                return ConnectionFailed(
                    f"the session ended while the message was being written ({cause}); "
                    "its end never left, so nothing was accepted",
                    reason="connection_lost_mid_message",
                )
        return SmtpOutcomeUnknown(
            f"no reply after the end of the message ({cause}); the server may have accepted it"
        )

    async def _opened(self, prepared: PreparedMessage, replies: list[SmtpReply]) -> OpenTransaction:
        """The transaction ready for its content, or its refusal raised (the session reset)."""
        if replies[0].code == 421 and self._may_be_stale:
            self._broken = True
            raise StaleConnection(f"the server is closing the session: {replies[0].text}")
        refused, failure = self._check_envelope(prepared.recipients, replies)
        if failure is None:
            return OpenTransaction(prepared.content, refused)
        if any(r.code == 421 for r in replies):
            self._broken = True  # 421: the server is closing the session
        else:
            data = replies[-1] if len(replies) == len(prepared.envelope) else None
            try:
                await self._reset(data)
            except (ConnectionFailed, ProtocolTimeout):
                self.abort()  # the refusal is the news; the pool replaces the session
        raise failure

    def _envelope_commands(
        self, sender: str, recipients: Sequence[str], message: bytes, size: int
    ) -> list[bytes]:
        _check_address(sender, "sender")
        if not recipients:
            raise InvalidInput("a message needs at least one recipient", reason="no_recipients")
        for recipient in recipients:
            _check_address(recipient, "recipient")
        params = self._mail_parameters(sender, recipients, message, size)
        mail = f"MAIL FROM:<{sender}>{params}\r\n".encode()
        return [mail, *(f"RCPT TO:<{r}>\r\n".encode() for r in recipients), b"DATA\r\n"]

    def _mail_parameters(
        self, sender: str, recipients: Sequence[str], message: bytes, size: int
    ) -> str:
        ext = self.extensions
        params = []
        if "SIZE" in ext:
            limit = int(ext["SIZE"]) if ext["SIZE"].isascii() and ext["SIZE"].isdigit() else 0
            if limit and size > limit:
                raise SmtpPermanentFailure(
                    552,
                    f"message size {size} exceeds the server's limit of {limit} bytes",
                    enhanced="5.3.4",
                    reason="message_too_large",
                )
            params.append(f"SIZE={size}")
        if _has_8bit(message) and "8BITMIME" in ext:
            # Without 8BITMIME we still send: rewriting MIME is the composer's job, and most
            # servers take 8-bit data anyway (Postfix does the same by default).
            params.append("BODY=8BITMIME")
        if _needs_utf8(sender, recipients):
            if "SMTPUTF8" not in ext:
                raise SmtpPermanentFailure(
                    553,
                    "the server does not support SMTPUTF8, needed for an internationalised address",
                    enhanced="5.6.7",
                    reason="smtputf8_unsupported",
                )
            params.append("SMTPUTF8")
        elif "SMTPUTF8" in ext and _has_8bit(message) and _has_8bit(_header_section(message)):
            params.append("SMTPUTF8")  # raw UTF-8 in the header section (RFC 6532)
        return "".join(" " + p for p in params)

    async def _pipelined(self, commands: list[bytes]) -> list[SmtpReply]:
        """RFC 2920: the whole envelope in one write, the replies read in order."""
        reader = self._require_reader()
        try:
            self._write(b"".join(commands))
            return await reader.read(len(commands), self.timeout)
        except ConnectionFailed as exc:
            raise self._envelope_lost(exc, list(reader.replies)) from None

    async def _lockstep(self, commands: list[bytes]) -> list[SmtpReply]:
        """Without PIPELINING: one command, one reply; stop as soon as DATA would be pointless."""
        replies: list[SmtpReply] = []
        mail, *rcpts, data = commands
        for command in (mail, *rcpts):
            try:
                self._write(command)
                replies.append(await self._read_one())
            except ConnectionFailed as exc:
                raise self._envelope_lost(exc, replies) from None
            if replies[0].code != 250 or replies[-1].code == 421:
                return replies  # refused, or the server is closing (RFC 5321 3.8): nothing more to say
        if all(r.code not in (250, 251) for r in replies[1:]):
            return replies
        self._write(data)
        replies.append(await self._read_one())
        return replies

    def _envelope_lost(self, exc: ConnectionFailed, replies: list[SmtpReply]) -> Exception:
        """The failure for a session lost during the envelope (no content was sent yet): the
        server's 421 when it said why it closed, else the loss."""
        self._broken = True
        if self._may_be_stale and (not replies or replies[0].code == 421):
            return StaleConnection(str(exc))
        closing = next((r for r in replies if r.code == 421), None)
        return reply_failure(closing) if closing is not None else exc

    def _check_envelope(
        self, recipients: Sequence[str], replies: list[SmtpReply]
    ) -> tuple[dict[str, tuple[int, str]], Exception | None]:
        """The refused recipients, and the failure to raise if the envelope was refused."""
        mail = replies[0]
        closing = next((r for r in replies if r.code == 421), None)
        if closing is not None:
            # The server is closing the session (RFC 5321 3.8): whatever came before it, this
            # transaction goes no further here; tried again later, to every recipient.
            return {}, reply_failure(closing)
        rcpt_replies = replies[1 : 1 + len(recipients)]
        data = replies[1 + len(recipients)] if len(replies) > 1 + len(recipients) else None
        refused = {
            r: (reply.code, reply.text)
            for r, reply in zip(recipients, rcpt_replies)
            if reply.code not in (250, 251)
        }
        if mail.code != 250:
            return refused, reply_failure(mail)
        if len(refused) == len(recipients):
            return refused, _all_refused(refused)
        if data is not None and data.code != 354:
            return refused, reply_failure(data, refused_recipients=refused)
        return refused, None

    async def _reset(self, data_reply: SmtpReply | None) -> None:
        """Leave the session ready for the next message after a refused envelope.

        RFC 2920 3.1: if DATA was accepted anyway, send a lone dot (an empty message to no
        accepted recipient delivers nothing), then RSET.
        """
        lines = [b".\r\n"] if data_reply is not None and data_reply.code == 354 else []
        lines.append(b"RSET\r\n")
        self._write(b"".join(lines))
        replies = await self._require_reader().read(len(lines), self.timeout)
        if replies[-1].code != 250:
            self._broken = True


# --------------------------------------------------------------------------- helpers


def _parse_ehlo(reply: SmtpReply) -> dict[str, str]:
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params
    # Some old servers announce AUTH as "AUTH=LOGIN PLAIN".
    for key in [k for k in extensions if k.startswith("AUTH=")]:
        extensions.setdefault("AUTH", key[5:] + " " + extensions[key])
    return extensions


def _all_refused(refused: dict[str, tuple[int, str]]) -> Exception:
    first_code, first_text = next(iter(refused.values()))
    if all(recipient_deferred(code, text) for code, text in refused.values()):
        return SmtpTemporaryFailure(
            first_code, first_text, refused_recipients=refused, reason="all_recipients_refused"
        )
    permanent = next((v for v in refused.values() if not recipient_deferred(*v)), (first_code, first_text))
    return SmtpPermanentFailure(
        permanent[0], permanent[1], refused_recipients=refused, reason="all_recipients_refused"
    )


def _check_auth_reply(reply: SmtpReply) -> None:
    if reply.code == 235:
        return
    if 400 <= reply.code < 500:
        # 454 "temporary authentication failure": the server's problem, worth a retry.
        raise SmtpTemporaryFailure(reply.code, reply.text, reason="auth_temporary")
    raise AuthenticationFailed(f"the server refused the login: {reply.code} {reply.text}")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _decode_challenge(text: str) -> str:
    try:
        return server_text(base64.b64decode(text.strip(), validate=True))
    except ValueError:
        return ""


def _tls_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed ({exc.verify_message})"
    return exc.reason or exc.__class__.__name__
