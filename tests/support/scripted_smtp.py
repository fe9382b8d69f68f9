"""Loopback SMTP servers written for tests, in the test's own loop (plain asyncio streams).

``ScriptedSmtpServer`` runs the session a test writes: every byte it sends is the test's, which is
how a test sends what no real server would (an injected reply, a doubled greeting, a 421 between
two RCPTs); ``well_behaved`` is the usual session, with hooks for the replies a test changes.

An SMTP server that notes what the client sent before each reply, to tell pipelining from lock-step.

``HoldingSmtpServer`` (plain asyncio streams on a loopback port, in the test's own loop) advertises
PIPELINING or not, and accepts every message.  It answers MAIL FROM only after it has read every
command the client sent with it, up to DATA, or after ``hold`` seconds of silence: a client that
pipelines (RFC 2920) has sent RCPT TO and DATA before MAIL's reply exists, and one in lock-step sends
nothing in that time.  For each transaction it records the commands that arrived before MAIL FROM
was answered (``Transaction.before_mail_reply``), and every command in the order it arrived.
"""
from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

END_OF_DATA = b"\r\n.\r\n"


@dataclass
class Transaction:
    mail_from: str
    before_mail_reply: list[str] = field(default_factory=list)  # verbs: "RCPT", "DATA"
    commands: list[str] = field(default_factory=list)           # every verb, MAIL first, in arrival order
    content: bytes = b""


class HoldingSmtpServer:
    def __init__(self, *, pipelining: bool, hold: float = 0.5) -> None:
        self.pipelining = pipelining
        self.hold = hold
        self.transactions: list[Transaction] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> HoldingSmtpServer:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def delivered(self) -> list[Transaction]:
        """The transactions whose content was accepted."""
        return [t for t in self.transactions if t.content]

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending: list[bytes] = []   # commands read ahead, while MAIL's reply was held
        transaction: Transaction | None = None

        async def next_line() -> bytes:
            return pending.pop(0) if pending else await reader.readline()

        try:
            writer.write(b"220 holding.test ESMTP\r\n")
            while line := await next_line():
                verb = line[:4].upper().decode(errors="replace")
                if verb in ("EHLO", "HELO"):
                    writer.write(b"250-holding.test\r\n" + (b"250-PIPELINING\r\n" if self.pipelining else b"")
                                 + b"250 8BITMIME\r\n")
                elif verb == "MAIL":
                    transaction = Transaction(line[10:].strip().decode(errors="replace"), commands=["MAIL"])
                    self.transactions.append(transaction)
                    while not pending or pending[-1][:4].upper() != b"DATA":
                        try:
                            ahead = await asyncio.wait_for(reader.readline(), self.hold)
                        except TimeoutError:
                            break  # the client waits for this reply: lock-step
                        if not ahead:
                            break
                        pending.append(ahead)
                    transaction.before_mail_reply = [p[:4].upper().decode(errors="replace") for p in pending]
                    writer.write(b"250 2.1.0 ok\r\n")
                elif verb == "RCPT":
                    if transaction is not None:
                        transaction.commands.append("RCPT")
                    writer.write(b"250 2.1.5 ok\r\n")
                elif verb == "DATA":
                    assert transaction is not None
                    transaction.commands.append("DATA")
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    transaction.content = await reader.readuntil(END_OF_DATA)
                    writer.write(b"250 2.0.0 queued\r\n")
                    transaction = None
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:  # RSET, NOOP
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


Session = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "ScriptedSmtpServer"], Awaitable[None]]


class ScriptedSmtpServer:
    """Runs ``session`` for each connection; notes every line the client sent and every content."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.connections = 0
        self.lines: list[bytes] = []      # every line the client sent, in order
        self.contents: list[bytes] = []   # each content received, up to its final dot
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedSmtpServer:
        self._server = await asyncio.start_server(self._run, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.session(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def line(self, reader: asyncio.StreamReader) -> bytes:
        data = await reader.readline()
        self.lines.append(data)
        return data

    async def content(self, reader: asyncio.StreamReader) -> bytes:
        data = await reader.readuntil(END_OF_DATA)
        self.contents.append(data)
        return data


def well_behaved(*, ehlo: bytes = b"250-scripted.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
                 greeting: bytes = b"220 scripted.test ESMTP\r\n", rcpt: Callable[[int], bytes] | None = None,
                 data_reply: bytes = b"250 2.0.0 queued\r\n", data_delay: float = 0.0) -> Session:
    """The usual session; ``rcpt(n)`` answers the n-th RCPT of a transaction (1-based); each final
    dot is answered ``data_delay`` seconds after it arrived (the content noted then)."""
    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: ScriptedSmtpServer) -> None:
        writer.write(greeting)
        n = 0
        while line := await server.line(reader):
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(ehlo if verb == b"EHLO" else b"250 scripted.test\r\n")
            elif verb == b"MAIL":
                n = 0
                writer.write(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                n += 1
                writer.write(rcpt(n) if rcpt else b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                content = await reader.readuntil(END_OF_DATA)
                if data_delay:
                    await asyncio.sleep(data_delay)   # a slow server, not a wait for the test's sake
                server.contents.append(content)
                writer.write(data_reply)
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
    return session
