"""Mail servers that never end a response: the IMAP and POP3 clients stop at a bound instead of
buffering until the replica is killed for its memory (every mailbox it works with it).  Scripted
servers, since no real one misbehaves on cue; the bound is lowered so the tests send a few MiB."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from services.ingest import wire
from services.ingest.imap_client import ImapClient
from services.ingest.pop3_client import Pop3Client
from shared.errors import ConnectionFailed
from tests.support.loopback import loopback_server

CHUNK = b"A" * 64 * 1024 + b"\r\n"


@pytest.fixture(autouse=True)
def small_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_MESSAGE_BYTES", 1024 * 1024)
    monkeypatch.setattr(wire, "_MAX_LINE", 64 * 1024)


async def stream_for_ever(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while True:
            writer.write(CHUNK)
            await writer.drain()


async def test_a_pop3_message_that_never_ends_is_refused_at_the_bound() -> None:
    async def pop3(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK ready\r\n")
        while line := await reader.readline():
            command = line.strip().upper()
            if command == b"CAPA":
                writer.write(b"+OK\r\nUIDL\r\n.\r\n")
            elif command.startswith(b"RETR"):
                writer.write(b"+OK\r\n")
                await stream_for_ever(writer)
                return
            else:
                writer.write(b"+OK\r\n")
            await writer.drain()

    async with loopback_server(pop3) as port:
        client = await Pop3Client.connect("127.0.0.1", port, tls="none", timeout=10)
        with pytest.raises(ConnectionFailed, match="more than 1 MiB without ending a response"):
            await asyncio.wait_for(client.retr(1), 30)


@pytest.mark.parametrize("announced", [99_999_999_999, 5 * 1024 * 1024])
async def test_an_imap_literal_over_the_bound_is_refused(announced: int) -> None:
    async def imap(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
        await writer.drain()
        await reader.readline()
        writer.write(b"* CAPABILITY IMAP4rev1 {%d}\r\n" % announced)
        await stream_for_ever(writer)

    async with loopback_server(imap) as port:
        client = await ImapClient.connect("127.0.0.1", port, tls="none", timeout=10)
        with pytest.raises(ConnectionFailed, match="more than the 1 MiB Conduit reads as one message"):
            await asyncio.wait_for(client.login("u", "p"), 30)
