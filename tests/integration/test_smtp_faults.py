"""The dispatch SMTP client against a server that misbehaves in ways aiosmtpd will not.

A tiny SMTP server written here (``FaultyServer``, plain asyncio streams on a loopback port) sends
exactly the bytes a test asks for: reply text with NUL, control characters and invalid UTF-8, and
replies or closes in the middle of DATA.  What is checked is what the send ledger acts on:

- reply text reaching ``SmtpAccepted``, failures and refused recipients is clean (it is stored in
  PostgreSQL ``text`` columns, which refuse NUL, and published in JSON status events);
- a server that refuses in the middle of DATA and closes gives its own verdict (552: permanent,
  421: temporary), and a server that closes while the message is still being written means
  "nothing was accepted" (retryable), while a close after the final dot stays
  ``SmtpOutcomeUnknown`` (never resent);
- a server that takes longer than the session's timeout to answer the final dot (scanning the
  content) is waited for, up to the data timeout (RFC 5321 4.5.3.2.6);
- a server that stops reading in the middle of DATA (alive, its receive window full) is given up
  once our buffer has not shrunk for the session's timeout, over TLS too, with "nothing was
  accepted" when the end of the message never left, while one that reads slowly but steadily gets
  the whole message, however long that takes.
"""
from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from services.dispatch.smtp_client import SmtpConnection, SmtpServer
from services.dispatch.smtp_transport import (
    SmtpAccepted,
    SmtpOutcomeUnknown,
    SmtpPermanentFailure,
    SmtpPool,
    SmtpTemporaryFailure,
)
from shared.errors import ConnectionFailed

SENDER = "sender@example.com"
EHLO_PIPELINING = b"250-faulty.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
EHLO_LOCKSTEP = b"250-faulty.test\r\n250 8BITMIME\r\n"
END_OF_DATA = b"\r\n.\r\n"
# Far more than the loopback socket buffers of both ends hold, so that the client's transport
# still buffers most of the message (writing paused) when the server stops reading.
BIG = 16 * 1024 * 1024
# What the server reads of the content before it refuses or closes.
PART = 200_000
# ``FaultyServer(small_buffers=True)``: what the server's socket and stream take in before the
# server reads them, and a real link's segment size (loopback's 64 KiB segments let the client's
# kernel take in several MB), so that a server that stops reading soon stops the client's writing.
SERVER_SOCKET_BUFFER = 64 * 1024
SERVER_STREAM_LIMIT = 64 * 1024
LINK_MSS = 1448
# A message far larger than all those buffers together (the client's kernel still takes in
# 1-2 MB), and the client's timeout, for a server that stops reading.
STALLED = 6 * 1024 * 1024
STALL_TIMEOUT = 1.0
# A slow but steady reader: a piece, then a pause, so at most 3.2 MB/s: ``SLOW`` takes at least
# 3.8 s to go through, nearly twice ``SLOW_TIMEOUT``, while what the client's kernel holds once its
# transport has drained (waited for with the reply, about 1.5 MB) takes a fraction of it.
SLOW_PIECE = 32 * 1024
SLOW_PAUSE = 0.01
SLOW = 12 * 1024 * 1024
SLOW_TIMEOUT = 2.0
# A server that scans the content before it answers the final dot: longer than the session's
# timeout, well within its data timeout (the service's is 600 s, RFC 5321 4.5.3.2.6).
SCAN = 2.5
SCAN_TIMEOUT = 1.0
SCAN_DATA_TIMEOUT = 10.0

T = TypeVar("T")
DataBehaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


def message(body: bytes = b"hello\r\n") -> bytes:
    return b"From: sender@example.com\r\nTo: rcpt@example.net\r\nSubject: faults\r\n\r\n" + body


def big_message(size: int = BIG) -> bytes:
    return message((b"x" * 76 + b"\r\n") * (size // 78))


# --------------------------------------------------------------------------- the server


def reply_after_dot(reply: bytes, *, scan: float = 0.0) -> DataBehaviour:
    """Read the whole content, then answer ``reply``, ``scan`` seconds later (a server checking the
    content for viruses or spam before it answers); the session goes on."""
    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await reader.readuntil(END_OF_DATA)
        if scan:
            await asyncio.sleep(scan)  # the slow peer under test, not a wait for something
        writer.write(reply + b"\r\n")
        return True
    return behave


def refuse_mid_data(reply: bytes) -> DataBehaviour:
    """Read part of the content, answer ``reply`` and close without reading the rest (as a server
    enforcing a size limit it did not advertise, or shutting down, does)."""
    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await reader.readexactly(PART)
        writer.write(reply + b"\r\n")
        await writer.drain()
        return False
    return behave


async def close_mid_data(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Read part of the content and close without a word."""
    await reader.readexactly(PART)
    return False


async def close_after_dot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Read the whole content, final dot included, and close without a word."""
    await reader.readuntil(END_OF_DATA)
    return False


def stop_reading(released: asyncio.Event) -> DataBehaviour:
    """Read none of the content (alive, its receive window full: an overloaded or stalled MTA)
    until ``released``, then close.  For a ``small_buffers`` server: otherwise the stream takes in
    megabytes on its own."""
    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await released.wait()
        return False
    return behave


def read_slowly(reply: bytes) -> DataBehaviour:
    """Read the content ``SLOW_PIECE`` by ``SLOW_PIECE`` with a pause after each, then answer
    ``reply``; the session goes on.  For a ``small_buffers`` server."""
    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        tail = b""
        while not tail.endswith(END_OF_DATA):
            piece = await reader.read(SLOW_PIECE)
            if not piece:
                return False
            tail = (tail + piece)[-len(END_OF_DATA):]
            await asyncio.sleep(SLOW_PAUSE)
        writer.write(reply + b"\r\n")
        return True
    return behave


class FaultyServer:
    """An SMTP server that says what it is told: its greeting, EHLO and RCPT replies are bytes,
    and each session's DATA is handled by the next behaviour in ``data`` (the last one repeats).

    ``small_buffers``: the server takes in little more than its behaviour reads (a few hundred
    KiB, see ``SERVER_SOCKET_BUFFER``) instead of whole messages."""

    def __init__(
        self,
        data: list[DataBehaviour],
        *,
        greeting: bytes = b"220 faulty.test ESMTP",
        ehlo: bytes = EHLO_PIPELINING,
        rcpt: dict[str, bytes] | None = None,
        tls: dict | None = None,
        small_buffers: bool = False,
    ) -> None:
        self.data = data
        self.small_buffers = small_buffers
        self.tls = tls  # the ``tls`` fixture: implicit TLS with its certificate
        self.greeting = greeting
        self.ehlo = ehlo
        self.rcpt = rcpt or {}
        self.sessions = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FaultyServer:
        # A large stream limit: ``readuntil`` looks for the end of data across a whole message.
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.tls["cert"], self.tls["key"])
        limit = SERVER_STREAM_LIMIT if self.small_buffers else 2 * BIG
        self._server = await asyncio.start_server(
            self._session, "127.0.0.1", 0, limit=limit, ssl=context
        )
        listener = self._server.sockets[0]
        if self.small_buffers:
            # On the listener: each session's socket has them from its handshake on.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SERVER_SOCKET_BUFFER)
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, LINK_MSS)
        self.port = listener.getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def server(self) -> SmtpServer:
        if self.tls is None:
            return SmtpServer("127.0.0.1", self.port, "none")
        return SmtpServer("127.0.0.1", self.port, "implicit", ssl_context=self.tls["client"])

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        behaviour = self.data[min(self.sessions, len(self.data) - 1)]
        self.sessions += 1
        try:
            writer.write(self.greeting + b"\r\n")
            if not self.greeting.startswith(b"220"):
                return
            recipients = 0
            while line := await reader.readline():
                command = line.rstrip(b"\r\n")
                verb = command[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(self.ehlo)
                elif verb == b"RCPT":
                    address = command.partition(b"<")[2].rstrip(b">").decode()
                    reply = self.rcpt.get(address, b"250 2.1.5 ok")
                    recipients += reply.startswith(b"250")
                    writer.write(reply + b"\r\n")
                elif verb == b"DATA" and not recipients:
                    writer.write(b"554 5.5.1 no valid recipients\r\n")
                elif verb == b"DATA":
                    recipients = 0
                    writer.write(b"354 go ahead\r\n")
                    if not await behaviour(reader, writer):
                        return
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                else:  # MAIL, RSET
                    recipients = 0
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[FaultyServer], Awaitable[SmtpConnection]]]:
    opened: list[SmtpConnection] = []

    async def open_session(
        server: FaultyServer, timeout: float = 10, data_timeout: float | None = None
    ) -> SmtpConnection:
        conn = SmtpConnection(server.server(), helo_name="client.test", timeout=timeout, data_timeout=data_timeout)
        await conn.open(None)
        opened.append(conn)
        return conn

    yield open_session
    for conn in opened:
        conn.abort()


def clean(text: str) -> bool:
    return not any(ord(ch) < 0x20 and ch != "\t" or 0x7F <= ord(ch) < 0xA0 for ch in text)


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """What ``awaitable`` gives; fails the test if it is still waiting after ``seconds``."""
    try:
        async with asyncio.timeout(seconds) as guard:
            return await awaitable
    except TimeoutError:
        if not guard.expired():
            raise
    pytest.fail(f"still waiting after {seconds:g} s", pytrace=False)


# --------------------------------------------------------------------------- server text


async def test_a_reply_with_nul_control_bytes_and_bad_utf8_gives_clean_text(connect) -> None:
    reply = b"250 2.0.0 queued as \x00ABC\x07\x1b[31m\tend \xff\xfe \xc3\xa9t\xc3\xa9 \x7f\xc2\x9b"
    async with FaultyServer([reply_after_dot(reply)]) as server:
        conn = await connect(server)
        accepted = await conn.send(SENDER, ["rcpt@example.net"], message())
    assert accepted.code == 250
    assert accepted.text == (
        "2.0.0 queued as \ufffdABC\ufffd\ufffd[31m\tend \ufffd\ufffd \u00e9t\u00e9 \ufffd\ufffd"
    )
    assert clean(accepted.text)


async def test_refusals_and_greetings_with_nul_give_clean_texts(connect) -> None:
    rcpt = {"gone@example.net": b"550 5.1.1 no\x00such\x1b user"}
    async with FaultyServer([reply_after_dot(b"250 ok")], rcpt=rcpt) as server:
        conn = await connect(server)
        accepted = await conn.send(SENDER, ["gone@example.net", "here@example.net"], message())
        assert accepted.refused_recipients == {"gone@example.net": (550, "5.1.1 no\ufffdsuch\ufffd user")}
        with pytest.raises(SmtpPermanentFailure) as refused:
            await conn.send(SENDER, ["gone@example.net"], message())
    assert refused.value.refused_recipients["gone@example.net"][1] == "5.1.1 no\ufffdsuch\ufffd user"
    assert clean(str(refused.value)) and clean(refused.value.text)

    async with FaultyServer([reply_after_dot(b"250 ok")], greeting=b"554 5.7.1 go\x00 away\rnow") as server:
        with pytest.raises(SmtpPermanentFailure) as greeting:
            await connect(server)
    assert greeting.value.code == 554
    assert greeting.value.text == "5.7.1 go\ufffd away\ufffdnow"
    assert clean(str(greeting.value))


async def test_long_and_many_line_replies_are_capped(connect) -> None:
    long_line = b"250 2.0.0 " + b"a" * 5000
    many = b"".join(b"250-" + b"b" * 400 + b"\r\n" for _ in range(300)) + b"250 last"
    async with FaultyServer([reply_after_dot(long_line), reply_after_dot(many)]) as server:
        first = await connect(server)
        accepted = await first.send(SENDER, ["rcpt@example.net"], message())
        assert len(accepted.text) == 1000 and accepted.text.startswith("2.0.0 aaa")
        second = await connect(server)
        accepted = await second.send(SENDER, ["rcpt@example.net"], message())
        assert len(accepted.text) == 1000 and accepted.text.startswith("bbb")
        assert await second.send(SENDER, ["rcpt@example.net"], message())  # still in step


# --------------------------------------------------------------------------- mid-DATA faults


@pytest.fixture(params=["plain", "tls"])
def tls_or_not(request: pytest.FixtureRequest) -> dict | None:
    """Each mid-DATA case over plain TCP and over implicit TLS.  Over TLS, asyncio's SSL layer
    hands a whole write on to the socket transport at once, whose buffer the client cannot see:
    the client can prove that the end of a message never left only when it never wrote it (large
    content leaves in pieces), and must otherwise say "unknown"."""
    return request.getfixturevalue("tls") if request.param == "tls" else None


@pytest.mark.parametrize("ehlo", [EHLO_PIPELINING, EHLO_LOCKSTEP], ids=["pipelining", "lockstep"])
async def test_552_in_the_middle_of_data_then_close_is_a_permanent_failure(connect, ehlo, tls_or_not) -> None:
    verdict = b"552 5.3.4 Message size exceeds fixed limit"
    async with FaultyServer([refuse_mid_data(verdict)], ehlo=ehlo, tls=tls_or_not) as server:
        conn = await connect(server)
        with pytest.raises(SmtpPermanentFailure) as failure:
            await conn.send(SENDER, ["rcpt@example.net"], big_message())
    assert failure.value.code == 552
    assert failure.value.enhanced == "5.3.4"
    assert failure.value.text == "5.3.4 Message size exceeds fixed limit"
    if tls_or_not is None:
        # The reply was read once the connection was gone (over TLS it may be read just before).
        assert not conn.usable


async def test_421_in_the_middle_of_data_then_close_is_a_temporary_failure(connect, tls_or_not) -> None:
    async with FaultyServer([refuse_mid_data(b"421 4.3.2 shutting down")], tls=tls_or_not) as server:
        conn = await connect(server)
        with pytest.raises(SmtpTemporaryFailure) as failure:
            await conn.send(SENDER, ["rcpt@example.net"], big_message())
    assert (failure.value.code, failure.value.text) == (421, "4.3.2 shutting down")
    assert not conn.usable


async def test_a_close_in_the_middle_of_data_means_nothing_was_accepted(connect, tls_or_not) -> None:
    # Over TLS too: the last piece of the content, with the end of the final dot, was never written.
    async with FaultyServer([close_mid_data], tls=tls_or_not) as server:
        conn = await connect(server)
        with pytest.raises(ConnectionFailed) as failure:
            await conn.send(SENDER, ["rcpt@example.net"], big_message())
    assert failure.value.reason == "connection_lost_mid_message"


async def test_a_yes_in_the_middle_of_data_then_close_is_outcome_unknown(connect) -> None:
    # The server said yes to something before the message ended: not "sent", not "not sent".
    async with FaultyServer([refuse_mid_data(b"250 2.0.0 ok")]) as server:
        conn = await connect(server)
        with pytest.raises(SmtpOutcomeUnknown):
            await conn.send(SENDER, ["rcpt@example.net"], big_message())


@pytest.mark.parametrize("size", ["small", "big"])
async def test_a_close_after_the_final_dot_without_reply_stays_outcome_unknown(
    connect, size, tls_or_not
) -> None:
    async with FaultyServer([close_after_dot], tls=tls_or_not) as server:
        conn = await connect(server)
        with pytest.raises(SmtpOutcomeUnknown):
            await conn.send(SENDER, ["rcpt@example.net"], big_message() if size == "big" else message())


# --------------------------------------------------------------------------- a server that answers the final dot slowly


async def test_a_server_that_scans_before_answering_the_final_dot_is_waited_for(tls_or_not) -> None:
    # Longer than the session's timeout, within its data timeout: accepted, not outcome unknown.
    # Through a pool, as the service sends; a big message, whose content leaves in pieces.
    behaviour = reply_after_dot(b"250 2.0.0 queued after a scan", scan=SCAN)
    async with FaultyServer([behaviour], tls=tls_or_not) as server:
        pool = SmtpPool(server.server(), None, max_connections=1, helo_name="client.test",
                        timeout=SCAN_TIMEOUT, data_timeout=SCAN_DATA_TIMEOUT)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            accepted = await within(4 * SCAN, pool.send(SENDER, ["rcpt@example.net"], big_message()))
            took = loop.time() - started
            assert (accepted.code, accepted.text) == (250, "2.0.0 queued after a scan")
            assert took > SCAN_TIMEOUT, f"the send took {took:.1f} s: too fast to show anything"
        finally:
            await pool.close()
    assert server.sessions == 1


async def test_a_refusal_mid_data_on_a_pool_settles_the_message_and_moves_the_one_riding_along() -> None:
    # The first session refuses the big message mid-DATA while the next message's envelope rides
    # along with its content; that message goes out on a second session.
    verdict = b"552 5.3.4 Message size exceeds fixed limit"
    async with FaultyServer([refuse_mid_data(verdict), reply_after_dot(b"250 2.0.0 queued")]) as server:
        pool = SmtpPool(server.server(), None, max_connections=1, helo_name="client.test", timeout=10)
        try:
            outcomes = await asyncio.gather(
                pool.send(SENDER, ["rcpt@example.net"], big_message()),
                pool.send(SENDER, ["rcpt@example.net"], message()),
                return_exceptions=True,
            )
        finally:
            await pool.close()
    assert pool.coalesced == 1
    assert isinstance(outcomes[0], SmtpPermanentFailure) and outcomes[0].code == 552
    assert isinstance(outcomes[1], SmtpAccepted) and outcomes[1].text == "2.0.0 queued"
    assert server.sessions == 2


# --------------------------------------------------------------------------- a server that stops reading


async def test_a_server_that_stops_reading_mid_data_is_given_up_and_nothing_was_accepted(connect, tls_or_not) -> None:
    # Given up after the session's timeout without progress, not after the data timeout (the
    # service's 600 s), over TLS too: there the content leaves in pieces, and the SSL layer pauses
    # us for the pieces it cannot pass on.
    released = asyncio.Event()
    async with FaultyServer([stop_reading(released)], small_buffers=True, tls=tls_or_not) as server:
        try:
            conn = await connect(server, timeout=STALL_TIMEOUT, data_timeout=600)
            with pytest.raises(ConnectionFailed) as failure:
                await within(3 * STALL_TIMEOUT, conn.send(SENDER, ["rcpt@example.net"], big_message(STALLED)))
        finally:
            released.set()
    assert failure.value.reason == "connection_lost_mid_message"  # retryable: the end never left
    assert "stopped reading the message" in str(failure.value)
    assert not conn.usable


async def test_a_stalled_session_on_a_pool_is_dropped_and_the_message_riding_along_moves() -> None:
    # The next message's envelope rode along with the stalled content: it never left either, so it
    # goes out on a second session.
    released = asyncio.Event()
    behaviours = [stop_reading(released), reply_after_dot(b"250 2.0.0 queued")]
    async with FaultyServer(behaviours, small_buffers=True) as server:
        pool = SmtpPool(server.server(), None, max_connections=1, helo_name="client.test", timeout=STALL_TIMEOUT)
        try:
            outcomes = await within(8 * STALL_TIMEOUT, asyncio.gather(
                pool.send(SENDER, ["rcpt@example.net"], big_message(STALLED)),
                pool.send(SENDER, ["rcpt@example.net"], message()),
                return_exceptions=True,
            ))
        finally:
            released.set()
            await pool.close()
    assert pool.coalesced == 1
    assert isinstance(outcomes[0], ConnectionFailed) and outcomes[0].reason == "connection_lost_mid_message"
    assert isinstance(outcomes[1], SmtpAccepted) and outcomes[1].text == "2.0.0 queued"
    assert server.sessions == 2


async def test_a_server_that_reads_slowly_but_steadily_gets_the_whole_message(connect, tls_or_not) -> None:
    # The timeout is on progress, not on the whole send, which lasts longer than the timeout here
    # (and than the data timeout, which is the timeout here).
    async with FaultyServer([read_slowly(b"250 2.0.0 queued")], small_buffers=True, tls=tls_or_not) as server:
        conn = await connect(server, timeout=SLOW_TIMEOUT)
        loop = asyncio.get_running_loop()
        started = loop.time()
        accepted = await within(60, conn.send(SENDER, ["rcpt@example.net"], big_message(SLOW)))
        took = loop.time() - started
        assert (accepted.code, accepted.text) == (250, "2.0.0 queued")
        assert took > SLOW_TIMEOUT, f"the send took {took:.1f} s: too fast to show anything"
        assert conn.usable
        assert await conn.send(SENDER, ["rcpt@example.net"], message())  # still in step
