"""The dispatch SMTP transport against real servers started by the tests.

- aiosmtpd (in-process, in its own thread): captures messages byte for byte, AUTH PLAIN/LOGIN and
  XOAUTH2, STARTTLS and implicit TLS with trustme certificates, scripted 4xx/5xx replies,
  dropped connections and slow answers to the final dot; with and without PIPELINING advertised,
  so both send paths run.
- Postfix ``smtp-sink`` (a subprocess): 1,000 messages, content checked from its ``-D`` dump.

Fixtures live in this file on purpose: the shared peers module is written elsewhere.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from services.dispatch.smtp_client import _CONTENT_PIECE
from services.dispatch.smtp_transport import (
    SmtpCredentials,
    SmtpOutcomeUnknown,
    SmtpPermanentFailure,
    SmtpPool,
    SmtpServer,
    SmtpTemporaryFailure,
    SmtpTransport,
    encode_content,
)
from shared.errors import AuthenticationFailed, ConnectionFailed, InvalidInput, TlsFailed

USER, PASSWORD, TOKEN = "alice@example.com", "s3cret-pw", "ya29.token-value"

# Edge cases for dot-stuffing and line endings: leading dots, a lone dot, bare LF, bare CR,
# no final newline, a dot as the very first byte of the content.
EDGE_BODIES = [
    b".starts with a dot\r\n..two dots\r\n.\r\n...\r\nend\r\n",
    b"bare\nline\nfeeds\n.\n",
    b"bare\rcarriage\rreturns\r.dot\r",
    b"no final newline\r\n.",
    b"line\r\n.\r\n\r\n.\r\nafter a lone dot",
]
# ``X-Script: scan``: the server answers the final dot this long after it arrived, as one that scans
# the content first: longer than the client's timeout, within its data timeout.
SCAN_SECONDS = 2.5


def message(n: int, body: bytes = b"hello\r\n", *, extra: bytes = b"") -> bytes:
    return (
        b"From: sender@example.com\r\nTo: rcpt@example.net\r\n"
        + f"Message-ID: <{n}@conduit.test>\r\nSubject: test {n}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


def on_the_wire(raw: bytes) -> bytes:
    """What a server must deliver for ``raw``: CRLF everywhere, ending with CRLF."""
    data = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(condition: Callable[[], bool], deadline: float = 5.0) -> None:
    """Poll a condition until a deadline: synchronisation with a server thread, not a sleep."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


# --------------------------------------------------------------------------- aiosmtpd capture


@dataclass
class Captured:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]


class ServerState:
    """What the capture server saw, shared between its thread and the test."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[Captured] = []
        self.sessions: set[SMTP] = set()
        self.max_sessions = 0
        self.total_sessions = 0
        self.pipelining = False
        self.refuse_ehlo = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drop_at_mail_once: str | None = None  # "abort" or "421"

    def opened(self, smtp: SMTP) -> None:
        with self.lock:
            if smtp not in self.sessions:
                self.total_sessions += 1
            self.sessions.add(smtp)
            self.max_sessions = max(self.max_sessions, len(self.sessions))

    def closed(self, smtp: SMTP) -> None:
        with self.lock:
            self.sessions.discard(smtp)

    def drop_all(self) -> None:
        """Close every session from the server side, as an idle timeout would."""
        assert self.loop is not None
        for smtp in list(self.sessions):
            if smtp.transport is not None:
                self.loop.call_soon_threadsafe(smtp.transport.close)


class CaptureHandler:
    """Records messages; the content and the addresses script failures."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.state.refuse_ehlo:
            return ["502 5.5.1 EHLO not implemented"]
        if self.state.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        mode, self.state.drop_at_mail_once = self.state.drop_at_mail_once, None
        if mode == "abort":
            # The server went away before reading the transaction (an idle session racing us).
            server.transport.abort()
            return "421 4.4.2 gone"
        if mode == "421":
            # Postfix on an idle timeout: "421 ... timeout exceeded", then close.
            server.loop.call_soon(server.transport.close)
            return "421 4.4.2 Error: timeout exceeded"
        if address.startswith("busy"):
            return "421 4.3.2 closing"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("refused"):
            return "550 5.1.1 <%s>: no such user" % address
        if address.startswith("full"):
            return "452 4.2.2 mailbox full"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        content = envelope.original_content
        if b"X-Script: 451" in content:
            return "451 4.3.0 try again later"
        if b"X-Script: 554" in content:
            return "554 5.6.0 content rejected"
        if b"X-Script: drop" in content:
            server.transport.abort()  # the dot arrived; the reply never leaves
            return "250 OK"
        if b"X-Script: scan" in content:
            await asyncio.sleep(SCAN_SECONDS)  # the slow peer under test, not a wait for something
        with self.state.lock:
            self.state.messages.append(
                Captured(envelope.mail_from, list(envelope.rcpt_tos), content,
                         list(envelope.mail_options))
            )
        return "250 2.0.0 Ok: queued"


class CaptureSMTP(SMTP):
    """aiosmtpd's SMTP plus session counting and an XOAUTH2 mechanism."""

    def __init__(self, handler, state: ServerState, **kwargs):
        super().__init__(handler, **kwargs)
        self.state = state

    def connection_made(self, transport):
        super().connection_made(transport)
        self.state.loop = self.loop
        self.state.opened(self)

    def connection_lost(self, error):
        self.state.closed(self)
        super().connection_lost(error)

    async def auth_XOAUTH2(self, _, args):
        raw = base64.b64decode(args[1]) if len(args) > 1 else b""
        fields = dict(f.split("=", 1) for f in raw.decode().split("\x01") if "=" in f)
        if fields.get("user") == USER and fields.get("auth") == f"Bearer {TOKEN}":
            return AuthResult(success=True, auth_data=USER)
        error = json.dumps({"status": "401", "schemes": "bearer", "scope": "https://mail/"})
        await self.challenge_auth(error)  # the client answers with an empty line
        return AuthResult(success=False, handled=False)


def authenticate(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data == (USER.encode(), PASSWORD.encode())
    return AuthResult(success=ok, handled=False)


class CaptureController(Controller):
    def __init__(self, state: ServerState, **kwargs):
        self.state = state
        super().__init__(CaptureHandler(state), hostname="127.0.0.1", port=free_port(), **kwargs)

    def factory(self):
        return CaptureSMTP(self.handler, self.state, **self.SMTP_kwargs)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_tls(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def client_tls(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def start_capture(**kwargs) -> tuple[CaptureController, ServerState]:
    state = ServerState()
    controller = CaptureController(
        state, authenticator=authenticate, auth_require_tls=False, **kwargs
    )
    controller.start()
    # Controller.start() opens one session of its own to check the server is up: forget it.
    deadline = time.monotonic() + 5
    while state.sessions and time.monotonic() < deadline:
        time.sleep(0.005)
    with state.lock:
        state.total_sessions = state.max_sessions = 0
    return controller, state


@pytest.fixture(params=["pipelining", "lockstep"])
def capture(request):
    """A plain-text capture server, with PIPELINING advertised or not."""
    controller, state = start_capture()
    state.pipelining = request.param == "pipelining"
    yield controller, state
    controller.stop()


@pytest.fixture
def starttls_capture(server_tls):
    controller, state = start_capture(tls_context=server_tls, require_starttls=True)
    state.pipelining = True
    yield controller, state
    controller.stop()


def plain_server(controller) -> SmtpServer:
    return SmtpServer(controller.hostname, controller.port, "none")


async def send_ok(pool: SmtpPool, n: int, recipients=("rcpt@example.net",), **kw):
    return await pool.send("sender@example.com", list(recipients), message(n, **kw))


# --------------------------------------------------------------------------- tests: happy paths


async def test_sends_and_reuses_one_connection(capture):
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None, max_connections=1)
    try:
        for n in range(5):
            accepted = await send_ok(pool, n)
            assert accepted.code == 250 and "queued" in accepted.text
            assert accepted.refused_recipients == {}
    finally:
        await pool.close()
    assert [m.mail_from for m in state.messages] == ["sender@example.com"] * 5
    assert state.total_sessions == 1


async def test_an_unexpected_failure_opening_a_session_fails_the_message_once_not_in_a_loop(capture, caplog):
    """A fault of ours or of a library while a session opens (not a server's answer): the message
    fails as a connection failure, retried by the send loop with back-off.  Before, it stayed queued
    and each failed worker started the next at once: one core busy, thousands of log lines a second."""
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None, max_connections=2)
    attempts = 0

    async def broken() -> None:   # the fault injected into our own code, the server is real
        nonlocal attempts
        attempts += 1
        raise RuntimeError("a fault while opening")

    pool._connect = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(ConnectionFailed, match="a fault while opening"):
            await asyncio.wait_for(send_ok(pool, 0), 5)
    finally:
        await pool.close()
    assert attempts == 1 and state.messages == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "failed unexpectedly" in errors[0].getMessage()
    errors[0].expected = True   # this test provokes it


async def test_dot_stuffing_and_line_endings_arrive_intact(capture):
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None, max_connections=2)
    raws = [message(n, body) for n, body in enumerate(EDGE_BODIES)] + [b".first byte is a dot\n"]
    try:
        await asyncio.gather(*(pool.send("s@example.com", ["r@example.net"], raw) for raw in raws))
    finally:
        await pool.close()
    assert sorted(m.content for m in state.messages) == sorted(on_the_wire(r) for r in raws)


async def test_large_messages_arrive_intact_whatever_their_size_against_the_write_pieces(capture):
    """Content above ``_CONTENT_PIECE`` leaves in pieces: sizes on and around piece boundaries, each
    followed by a message whose envelope rides along with its last piece (with PIPELINING)."""
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None, max_connections=1)
    line = b".dotted " + b"x" * 68 + b"\r\n"  # 79 bytes on the wire, dot-stuffed
    raws = []
    for wire in (_CONTENT_PIECE + 1, 2 * _CONTENT_PIECE - 1, 2 * _CONTENT_PIECE, 2 * _CONTENT_PIECE + 1):
        head = message(len(raws), b"")
        body = head + line * ((wire - len(head) - 5) // 79)
        # Padded so that the content on the wire, with its last CRLF and the final ".\r\n", is ``wire``.
        raw = body + b"y" * (wire - (len(encode_content(body)) - 3) - 5) + b"\r\n"
        assert len(encode_content(raw)) == wire
        raws += [raw, message(len(raws) + 1)]
    try:
        await asyncio.gather(*(pool.send("s@example.com", ["r@example.net"], raw) for raw in raws))
    finally:
        await pool.close()
    assert [m.content for m in state.messages] == [on_the_wire(r) for r in raws]


async def test_eight_bit_and_utf8_parameters(capture):
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None)
    try:
        await pool.send("s@example.com", ["r@example.net"], message(1, "café\r\n".encode()))
        await pool.send("jösé@example.com", ["r@example.net"], message(2))
    finally:
        await pool.close()
    first, second = state.messages
    assert "BODY=8BITMIME" in first.mail_options
    assert "SMTPUTF8" in second.mail_options and second.mail_from == "jösé@example.com"


async def test_helo_fallback_when_ehlo_is_refused(capture):
    controller, state = capture
    state.refuse_ehlo = True
    pool = SmtpPool(plain_server(controller), None)
    try:
        await send_ok(pool, 1)
    finally:
        await pool.close()
    assert len(state.messages) == 1


async def test_invalid_addresses_never_reach_the_server(capture):
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None)
    try:
        with pytest.raises(InvalidInput):
            await pool.send("s@example.com", ["a@example.net>\r\nRCPT TO:<b@x"], message(1))
        with pytest.raises(InvalidInput):
            await pool.send("s@example.com", [], message(1))
        await send_ok(pool, 2)  # the session is still fine
    finally:
        await pool.close()
    assert len(state.messages) == 1


# --------------------------------------------------------------------------- tests: failures


async def test_451_at_data_is_temporary_and_session_stays_usable(capture):
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None, max_connections=1)
    try:
        with pytest.raises(SmtpTemporaryFailure) as info:
            await send_ok(pool, 1, extra=b"X-Script: 451\r\n")
        assert (info.value.code, info.value.enhanced) == (451, "4.3.0")
        assert "try again later" in info.value.text
        await send_ok(pool, 2)
    finally:
        await pool.close()
    assert len(state.messages) == 1 and state.total_sessions == 1


async def test_554_at_data_is_permanent(capture):
    controller, _ = capture
    pool = SmtpPool(plain_server(controller), None)
    try:
        with pytest.raises(SmtpPermanentFailure) as info:
            await send_ok(pool, 1, extra=b"X-Script: 554\r\n")
        assert info.value.code == 554 and info.value.enhanced == "5.6.0"
    finally:
        await pool.close()


async def test_one_of_two_recipients_refused(capture):
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None, max_connections=1)
    try:
        accepted = await send_ok(pool, 1, recipients=("ok@example.net", "refused@example.net"))
    finally:
        await pool.close()
    assert accepted.code == 250
    assert list(accepted.refused_recipients) == ["refused@example.net"]
    code, text = accepted.refused_recipients["refused@example.net"]
    assert code == 550 and "no such user" in text
    assert state.messages[0].rcpt_tos == ["ok@example.net"]


async def test_all_recipients_refused_is_permanent_then_session_is_reused(capture):
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None, max_connections=1)
    try:
        with pytest.raises(SmtpPermanentFailure) as info:
            await send_ok(pool, 1, recipients=("refused1@example.net", "refused2@example.net"))
        assert info.value.code == 550 and info.value.reason == "all_recipients_refused"
        assert set(info.value.refused_recipients) == {"refused1@example.net", "refused2@example.net"}
        with pytest.raises(SmtpTemporaryFailure):
            await send_ok(pool, 2, recipients=("full@example.net",))
        await send_ok(pool, 3)
    finally:
        await pool.close()
    assert len(state.messages) == 1 and state.total_sessions == 1


async def test_421_at_mail_is_temporary(capture):
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None, max_connections=1)
    try:
        with pytest.raises(SmtpTemporaryFailure) as info:  # fresh session: no retry
            await pool.send("busy@example.com", ["r@example.net"], message(1))
        assert info.value.code == 421 and state.total_sessions == 1
        await send_ok(pool, 2)
        with pytest.raises(SmtpTemporaryFailure) as info:  # reused session: one retry
            await pool.send("busy@example.com", ["r@example.net"], message(3))
        assert info.value.code == 421 and state.total_sessions == 3
    finally:
        await pool.close()


async def test_drop_after_data_is_outcome_unknown_and_not_retried(capture):
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None, max_connections=1)
    try:
        with pytest.raises(SmtpOutcomeUnknown):
            await send_ok(pool, 1, extra=b"X-Script: drop\r\n")
        assert state.total_sessions == 1  # no internal retry
        await send_ok(pool, 2)  # a new session replaces the dead one
    finally:
        await pool.close()
    assert state.total_sessions == 2 and len(state.messages) == 1


async def test_a_slow_answer_to_the_final_dot_is_waited_for_up_to_the_data_timeout():
    """The verdict comes after the transport's timeout, within its data timeout: accepted, and the
    next message, whose envelope rode along with the content, goes out on the same session."""
    controller, state = start_capture()
    state.pipelining = True
    transport = SmtpTransport(timeout=1, data_timeout=10)
    pool = transport.pool(plain_server(controller), None, max_connections=1)
    try:
        scanned, after = await asyncio.gather(send_ok(pool, 1, extra=b"X-Script: scan\r\n"), send_ok(pool, 2))
    finally:
        await transport.close()
        controller.stop()
    assert scanned.code == 250 and after.code == 250
    assert pool.coalesced == 1 and state.total_sessions == 1 and len(state.messages) == 2


async def test_a_stream_on_one_session_settles_each_message_as_scripted(capture):
    """Many messages at once on one session: with PIPELINING each envelope rides with the previous
    message's content, so every failure also happens in that position.  A drop after a dot leaves
    that message unknown and moves the next one, whose envelope was lost with the session."""
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None, max_connections=1)
    scripts = {3: "refused", 7: "full", 11: "451", 15: "554", 19: "drop", 23: "refused", 24: "drop"}

    async def one(n: int) -> str:
        script = scripts.get(n)
        recipients = [f"{script}@example.net"] if script in ("refused", "full") else ["rcpt@example.net"]
        extra = f"X-Script: {script}\r\n".encode() if script in ("451", "554", "drop") else b""
        try:
            await pool.send("sender@example.com", recipients, message(n, extra=extra))
        except SmtpOutcomeUnknown:
            return "unknown"
        except SmtpPermanentFailure as exc:
            return f"permanent {exc.code}"
        except SmtpTemporaryFailure as exc:
            return f"temporary {exc.code}"
        return "sent"

    try:
        outcomes = await asyncio.gather(*(one(n) for n in range(40)))
    finally:
        await pool.close()
    expected = {3: "permanent 550", 7: "temporary 452", 11: "temporary 451", 15: "permanent 554",
                19: "unknown", 23: "permanent 550", 24: "unknown"}
    assert {n: o for n, o in enumerate(outcomes) if o != "sent"} == expected
    delivered = [int(m.content.split(b"Message-ID: <")[1].split(b"@")[0]) for m in state.messages]
    assert sorted(delivered) == [n for n in range(40) if n not in expected]  # each once
    assert state.total_sessions == 3  # a new session after each drop
    if state.pipelining:
        assert pool.coalesced > 30
    else:
        assert pool.coalesced == 0


async def test_idle_sessions_dropped_by_server_are_replaced(capture):
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None, max_connections=2)
    try:
        await asyncio.gather(send_ok(pool, 1), send_ok(pool, 2))
        state.drop_all()
        await wait_for(lambda: not state.sessions)
        await asyncio.gather(send_ok(pool, 3), send_ok(pool, 4))
    finally:
        await pool.close()
    assert len(state.messages) == 4


@pytest.mark.parametrize("how", ["abort", "421"])
async def test_reused_session_found_dead_at_mail_is_retried_once(capture, how):
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None, max_connections=1)
    try:
        await send_ok(pool, 1)
        state.drop_at_mail_once = how
        await send_ok(pool, 2)
    finally:
        await pool.close()
    assert len(state.messages) == 2 and state.total_sessions == 2


async def test_max_connections_respected_under_concurrency(capture):
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None, max_connections=3)
    try:
        await asyncio.gather(*(send_ok(pool, n) for n in range(60)))
        assert pool.open_connections <= 3
    finally:
        await pool.close()
    assert len(state.messages) == 60
    assert state.max_sessions == 3


async def test_an_edited_connection_limit_resizes_the_pool_without_losing_a_message(capture):
    controller, state = capture
    transport = SmtpTransport()
    server = plain_server(controller)
    try:
        pool = transport.pool(server, None, max_connections=1)
        await asyncio.gather(*(send_ok(pool, n) for n in range(20)))
        assert state.max_sessions == 1
        assert transport.pool(server, None, max_connections=3) is pool   # raised: more sessions
        await asyncio.gather(*(send_ok(pool, n) for n in range(20, 80)))
        assert state.max_sessions == 3
        busy = [asyncio.ensure_future(send_ok(pool, n)) for n in range(80, 200)]
        while pool._idle or pool.open_connections < 3:   # until the burst holds all three sessions
            assert not all(b.done() for b in busy)
            await asyncio.sleep(0)
        assert transport.pool(server, None, max_connections=1) is pool   # lowered while they work
        await asyncio.gather(*busy)
        assert pool.open_connections == 1
    finally:
        await transport.close()
    assert len(state.messages) == 200


async def test_messages_per_connection_limit_rotates_sessions(capture):
    controller, state = capture
    pool = SmtpPool(plain_server(controller), None, max_connections=1,
                    max_messages_per_connection=2)
    try:
        for n in range(5):
            await send_ok(pool, n)
    finally:
        await pool.close()
    assert state.total_sessions == 3


async def test_connection_refused():
    pool = SmtpPool(SmtpServer("127.0.0.1", free_port(), "none"), None, timeout=5)
    with pytest.raises(ConnectionFailed):
        await send_ok(pool, 1)


async def test_size_limit_is_respected():
    controller, state = start_capture(data_size_limit=4096)
    pool = SmtpPool(plain_server(controller), None)
    try:
        with pytest.raises(SmtpPermanentFailure) as info:
            await send_ok(pool, 1, body=b"x" * 5000)
        assert info.value.reason == "message_too_large" and info.value.code == 552
        await send_ok(pool, 2)
    finally:
        await pool.close()
        controller.stop()
    assert len(state.messages) == 1


# --------------------------------------------------------------------------- tests: AUTH and TLS


@pytest.mark.parametrize("mechanism", ["plain", "login"])
async def test_auth_password_mechanisms(capture, mechanism):
    controller, state = capture
    good = SmtpCredentials(USER, PASSWORD, mechanism)
    pool = SmtpPool(plain_server(controller), good)
    try:
        await pool.check()
        await send_ok(pool, 1)
    finally:
        await pool.close()
    assert len(state.messages) == 1

    bad = SmtpPool(plain_server(controller), SmtpCredentials(USER, "wrong", mechanism))
    with pytest.raises(AuthenticationFailed) as info:
        await bad.check()
    assert "wrong" not in str(info.value)


async def test_xoauth2(capture):
    controller, state = capture
    pool = SmtpPool(plain_server(controller), SmtpCredentials(USER, TOKEN, "xoauth2"))
    try:
        await send_ok(pool, 1)
    finally:
        await pool.close()
    assert len(state.messages) == 1

    expired = SmtpPool(plain_server(controller), SmtpCredentials(USER, "expired", "xoauth2"))
    with pytest.raises(AuthenticationFailed) as info:
        await expired.check()
    assert "535" in str(info.value) and '"status": "401"' in str(info.value)
    assert "expired" not in str(info.value)


def test_secret_is_not_in_repr():
    assert PASSWORD not in repr(SmtpCredentials(USER, PASSWORD))


async def test_starttls_verified_with_auth(starttls_capture, client_tls):
    controller, state = starttls_capture
    server = SmtpServer(controller.hostname, controller.port, "starttls", client_tls)
    pool = SmtpPool(server, SmtpCredentials(USER, PASSWORD))
    try:
        await pool.check()
        await send_ok(pool, 1)
    finally:
        await pool.close()
    assert len(state.messages) == 1


async def test_starttls_untrusted_certificate_fails(starttls_capture):
    controller, state = starttls_capture
    # The default context trusts the system CAs, not the test CA.
    pool = SmtpPool(SmtpServer(controller.hostname, controller.port, "starttls"), None)
    with pytest.raises(TlsFailed) as info:
        await send_ok(pool, 1)
    assert "certificate verification failed" in str(info.value)
    assert not state.messages


async def test_starttls_missing_is_refused(capture, client_tls):
    controller, _ = capture
    pool = SmtpPool(SmtpServer(controller.hostname, controller.port, "starttls", client_tls), None)
    with pytest.raises(TlsFailed):
        await pool.check()


async def test_implicit_tls(server_tls, client_tls):
    controller, state = start_capture(ssl_context=server_tls)
    try:
        pool = SmtpPool(SmtpServer(controller.hostname, controller.port, "implicit", client_tls),
                        SmtpCredentials(USER, PASSWORD))
        await send_ok(pool, 1)
        await pool.close()
        untrusted = SmtpPool(SmtpServer(controller.hostname, controller.port, "implicit"), None)
        with pytest.raises(TlsFailed):
            await untrusted.check()
    finally:
        controller.stop()
    assert len(state.messages) == 1


async def test_transport_keeps_one_pool_per_server_and_login(capture):
    controller, state = capture
    transport = SmtpTransport()
    server = plain_server(controller)
    try:
        a = transport.pool(server, SmtpCredentials(USER, PASSWORD))
        assert transport.pool(server, SmtpCredentials(USER, PASSWORD)) is a
        rotated = transport.pool(server, SmtpCredentials(USER, "new-password"))
        assert rotated is not a
        await send_ok(transport.pool(server, None), 1)
    finally:
        await transport.close()
    assert len(state.messages) == 1


# --------------------------------------------------------------------------- Postfix smtp-sink


def find_postfix_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/lib/postfix/sbin")


@pytest.fixture
def smtp_sink():
    """``smtp-sink`` on a free port, dumping every transaction to one file (-D)."""
    binary = find_postfix_tool("smtp-sink")
    if binary is None:
        pytest.skip("Postfix smtp-sink is not installed (apt-get install postfix)")
    workdir = Path(tempfile.mkdtemp(prefix="conduit-smtp-sink-"))
    os.chmod(workdir, 0o777)  # smtp-sink writes the dump as nobody
    port = free_port()
    args = [binary, "-D", str(workdir / "dump"), f"127.0.0.1:{port}", "256"]
    if os.geteuid() == 0:
        args[1:1] = ["-u", "nobody"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while True:  # ready when it accepts a connection
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"smtp-sink did not start: {proc.stderr.read()!r}")
                time.sleep(0.01)
        yield port, workdir / "dump"
    finally:
        proc.terminate()
        proc.wait(5)
        proc.stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)


def parse_sink_dump(dump: bytes) -> dict[bytes, bytes]:
    """Message-ID -> content, from smtp-sink's -D dump (LF line endings, X- envelope headers)."""
    contents = {}
    for chunk in dump.split(b"X-Client-Addr: ")[1:]:
        lines = chunk.split(b"\n")
        start = next(i for i, l in enumerate(lines) if l.startswith(b"Received: "))
        start += 1
        while lines[start].startswith(b"\t"):  # the Received: header's continuation lines
            start += 1
        content = b"\n".join(lines[start:])[: -len(b"\n\n")] + b"\n"
        message_id = next(l for l in content.split(b"\n") if l.startswith(b"Message-ID: "))
        contents[message_id] = content
    return contents


@pytest.mark.peers
async def test_smtp_sink_accepts_1000_messages_with_edge_cases_intact(smtp_sink):
    port, dump = smtp_sink
    pool = SmtpPool(SmtpServer("127.0.0.1", port, "none"), None, max_connections=10)
    raws = [message(n, EDGE_BODIES[n % len(EDGE_BODIES)]) for n in range(1000)]
    try:
        results = await asyncio.gather(
            *(pool.send("s@example.com", ["r@example.net", "q@example.net"], raw) for raw in raws)
        )
    finally:
        await pool.close()
    assert all(r.code == 250 and not r.refused_recipients for r in results)
    await wait_for(lambda: dump.exists() and dump.read_bytes().count(b"X-Client-Addr: ") == 1000)
    received = parse_sink_dump(dump.read_bytes())
    assert len(received) == 1000
    for n, raw in enumerate(raws):
        expected = on_the_wire(raw).replace(b"\r\n", b"\n")
        assert received[f"Message-ID: <{n}@conduit.test>".encode()] == expected, n
