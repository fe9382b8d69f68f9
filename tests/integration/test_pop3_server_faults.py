"""POP3 servers that answer outside the protocol, or fail as a whole: the client and the sync against
scripted servers (exact bytes), the sync with the real PostgreSQL and broker.

From a review that reproduced each: a message that ends early (a line "." not byte-stuffed) put the
client out of step, so that one message was filed under another's UIDL; a bare "-ERR" to every RETR
(a storage outage) had every new message skipped after three sessions; "[SYS/PERM]" at sign-in was
reported as wrong credentials; one UIDL outside RFC 1939 stopped the whole maildrop; an XOAUTH2
initial response made AUTH longer than RFC 5034's 255 octets.  (And one found right: what a server
sends after STLS's +OK, before the handshake, is never read as a reply inside TLS.)"""
from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import uuid
from collections.abc import Callable

import pytest
import trustme

from services.ingest import state
from services.ingest.pop3_client import OutOfStep, Pop3Client
from services.ingest.pop3_sync import Pop3Sync
from services.ingest.publishing import Mailbox
from services.ingest.sasl import xoauth2_initial_response
from shared.errors import AuthenticationFailed, ConduitError, PermanentError, TransientError
from shared.events.topics import EMAIL_RECEIVED
from tests.support.topics import read_topic
from tests.support.loopback import loopback_server


@pytest.fixture(autouse=True)
def quiet_kafka(caplog):
    caplog.set_level(logging.CRITICAL, logger="aiokafka")


def msg(n: int) -> bytes:
    return (f"From: a@customer.example\r\nTo: x@example.com\r\nSubject: m{n}\r\n"
            f"Message-ID: <m{n}-{uuid.uuid4().hex}@x>\r\n\r\nbody {n}\r\n").encode()


def message_id(raw: bytes) -> str:
    return raw.split(b"Message-ID: <")[1].split(b">")[0].decode()


async def new_mailbox(registry, org) -> Mailbox:
    email = f"u-{uuid.uuid4().hex[:8]}@example.com"
    await registry.add_user(org, "U", email)
    m = await registry.mailbox(org, email)
    return Mailbox(m.id, org.id, False, None)


class Pop3Server:
    """A maildrop of (uidl, raw bytes sent as they are, byte-stuffed or not).  ``answer(verb, arg)``
    may answer a command instead (bytes), or leave it to the defaults (None)."""

    def __init__(self, messages, *, capa: bytes = b"USER\r\nUIDL\r\n",
                 answer: Callable[[bytes, bytes], bytes | None] | None = None) -> None:
        self.messages = list(messages)
        self.capa = capa
        self.answer = answer
        self.commands: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK ready\r\n")
        try:
            await writer.drain()
            while line := await reader.readline():
                command = line.rstrip(b"\r\n")
                self.commands.append(command)
                verb, _, arg = command.partition(b" ")
                verb = verb.upper()
                out = self.answer(verb, arg) if self.answer else None
                if out is None:
                    out = self._default(verb, arg)
                writer.write(out)
                await writer.drain()
                if verb == b"QUIT":
                    break
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _default(self, verb: bytes, arg: bytes) -> bytes:
        if verb == b"CAPA":
            return b"+OK\r\n" + self.capa + b".\r\n"
        if verb == b"UIDL":
            return b"+OK\r\n" + b"".join(b"%d %s\r\n" % (i, u) for i, (u, _) in enumerate(self.messages, 1)) + b".\r\n"
        if verb == b"LIST":
            return b"+OK\r\n" + b"".join(b"%d %d\r\n" % (i, len(r)) for i, (_, r) in enumerate(self.messages, 1)) + b".\r\n"
        if verb == b"RETR":
            return b"+OK\r\n" + self.messages[int(arg) - 1][1] + b".\r\n"
        if verb == b"QUIT":
            return b"+OK bye\r\n"
        return b"+OK\r\n"


async def connect(port: int) -> Pop3Client:
    return await Pop3Client.connect("127.0.0.1", port, tls="none", timeout=3)


async def session(port: int, pool, publisher, mailbox: Mailbox) -> tuple[Pop3Sync, ConduitError | None]:
    """One session as the runner has it: QUIT after a sync that worked, a close without it otherwise."""
    client = await connect(port)
    await client.login("u", "p")
    sync = Pop3Sync(pool, publisher, mailbox)
    try:
        await sync.sync(client)
        await client.quit()
    except ConduitError as exc:
        await client.close()
        return sync, exc
    return sync, None


async def seen(pool, mailbox: Mailbox) -> set[str]:
    async with pool.acquire() as conn:
        return await state.pop3_seen(conn, mailbox.id)


# ---- a reply out of step -------------------------------------------------------------------------


@pytest.mark.parametrize("capa", [b"USER\r\nUIDL\r\n", b"USER\r\nUIDL\r\nPIPELINING\r\n"], ids=["one-by-one", "pipelined"])
async def test_a_retr_that_ends_early_does_not_file_one_message_under_anothers_uidl(
        settings, registry, org, pool, publisher, capa) -> None:
    """A server that does not byte-stuff a line "." inside message 1 ends it there, and the rest of
    it stands where RETR 2's status line should.  Before, that line was taken for a refusal of 2,
    and every reply after for the next RETR's: message 2 was published under message 4's UIDL, and
    message 4 never.  Now the session ends there, and message 1, cut short, is not stored (it counts
    as refused): the next session, the server mended, retrieves each message whole under its UIDL."""
    mailbox = await new_mailbox(registry, org)
    m = [msg(i) for i in range(1, 5)]
    server = Pop3Server([(b"a", m[0] + b".\r\ntail of message 1\r\n"), (b"b", m[1]), (b"c", m[2]), (b"d", m[3])],
                        capa=capa)
    async with loopback_server(server.handle) as port:
        _, failure = await session(port, pool, publisher, mailbox)
        assert isinstance(failure, OutOfStep) and failure.suspect == 1, failure
        assert b"QUIT" not in server.commands
        assert await seen(pool, mailbox) == set()
        server.messages[0] = (b"a", m[0])   # the server is mended
        _, failure = await session(port, pool, publisher, mailbox)
        assert failure is None, failure
    events = [e["data"] for e in await read_topic(settings, EMAIL_RECEIVED.name, 4, timeout=5)]
    assert {e["uidl"]: (e["message_id"], e["size"]) for e in events} == {
        uidl: (message_id(raw), len(raw)) for uidl, raw in zip("abcd", m)}


@pytest.mark.parametrize("command", ["stat", "noop", "dele_many"])
async def test_a_status_line_neither_ok_nor_err_ends_the_session(command: str) -> None:
    """Any command answered by a line that is neither "+OK" nor "-ERR": out of step, not a refusal
    (a DELE "refused" so would leave the replies after it to be read as the next commands')."""
    server = Pop3Server([(b"a", msg(1)), (b"b", msg(2))], capa=b"USER\r\nUIDL\r\nPIPELINING\r\n",
                        answer=lambda verb, arg: b"tail of some message\r\n" if verb in (b"STAT", b"NOOP", b"DELE") else None)
    async with loopback_server(server.handle) as port:
        client = await connect(port)
        try:
            await client.login("u", "p")
            with pytest.raises(OutOfStep):
                if command == "dele_many":
                    await client.dele_many([1, 2])
                else:
                    await getattr(client, command)()
        finally:
            await client.close()
    assert b"QUIT" not in server.commands


# ---- every RETR refused ---------------------------------------------------------------------------


async def test_a_server_wide_retr_failure_without_a_code_does_not_skip_every_message(
        settings, registry, org, pool, publisher) -> None:
    """Every RETR answered by a bare "-ERR" (a storage outage on a server that sends no [SYS/TEMP])
    for three sessions: before, every new message was skipped for ever.  Now such a session fails,
    transiently, and counts no refusal, so the messages come once the server serves again."""
    mailbox = await new_mailbox(registry, org)
    broken = {"on": True}
    server = Pop3Server([(b"a", msg(1)), (b"b", msg(2))],
                        answer=lambda verb, arg: b"-ERR Unable to read message from storage\r\n"
                        if verb == b"RETR" and broken["on"] else None)
    async with loopback_server(server.handle) as port:
        for _ in range(3):
            sync, failure = await session(port, pool, publisher, mailbox)
            assert isinstance(failure, TransientError) and "storage" in failure.message, failure
            assert sync.warnings == []
        broken["on"] = False
        _, failure = await session(port, pool, publisher, mailbox)
        assert failure is None, failure
    events = await read_topic(settings, EMAIL_RECEIVED.name, 2, timeout=5)
    assert sorted(e["data"]["uidl"] for e in events) == ["a", "b"]


async def test_one_message_refused_among_served_ones_is_still_skipped_after_three_sessions(
        settings, registry, org, pool, publisher) -> None:
    """The counterpart: a message the server will not serve while it serves the others is refused,
    and skipped (recorded as seen, with a warning naming its UIDL) at its third refusal."""
    mailbox = await new_mailbox(registry, org)
    server = Pop3Server([(b"a", msg(1)), (b"b", msg(2)), (b"c", msg(3))],
                        answer=lambda verb, arg: b"-ERR Message could not be read\r\n" if verb == b"RETR" and arg == b"2" else None)
    async with loopback_server(server.handle) as port:
        codes = []
        for _ in range(3):
            sync, failure = await session(port, pool, publisher, mailbox)
            assert failure is None, failure
            codes.append([code for code, text in sync.warnings if "UIDL b" in text])
    assert codes == [["messages_refused"], ["messages_refused"], ["messages_skipped"]]
    assert await seen(pool, mailbox) == {"a", "b", "c"}
    events = await read_topic(settings, EMAIL_RECEIVED.name, 2, timeout=5)
    assert sorted(e["data"]["uidl"] for e in events) == ["a", "c"]


# ---- signing in -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("reply", "kind", "reason"), [
    (b"-ERR [SYS/PERM] Mailbox is corrupted, contact the administrator", PermanentError, "server_refused"),
    (b"-ERR [AUTH] Authentication failed", AuthenticationFailed, "authentication_failed"),
    (b"-ERR Authentication failed", AuthenticationFailed, "authentication_failed"),
    (b"-ERR [SYS/TEMP] Try again later", TransientError, "server_unavailable"),
], ids=["sys-perm", "auth", "no-code", "sys-temp"])
async def test_a_refused_sign_in_is_told_by_its_response_code(reply: bytes, kind: type, reason: str) -> None:
    """RFC 3206: [SYS/PERM] is a permanent error of the system (Dovecot: a mailbox it cannot open),
    [AUTH] the credentials.  Before, [SYS/PERM] was reported as wrong credentials (and counted
    toward a profile's stop after refused sign-ins)."""
    server = Pop3Server([], answer=lambda verb, arg: reply + b"\r\n" if verb == b"PASS" else None)
    async with loopback_server(server.handle) as port:
        client = await connect(port)
        try:
            with pytest.raises(ConduitError) as caught:
                await client.login("u", "p")
        finally:
            await client.close()
    assert type(caught.value) is kind and caught.value.reason == reason, caught.value


class SaslServer(Pop3Server):
    """Refuses an AUTH command longer than 255 octets (RFC 5034 section 4); ``AUTH XOAUTH2`` alone
    gets an empty challenge, and then the response on a line of its own."""

    def __init__(self, expected: bytes) -> None:
        super().__init__([], capa=b"USER\r\nUIDL\r\nSASL XOAUTH2\r\n")
        self.expected = expected

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK ready\r\n")
        try:
            await writer.drain()
            while line := await reader.readline():
                self.commands.append(line)
                command = line.rstrip(b"\r\n")
                if len(line) > 255:
                    out = b"-ERR Command line too long\r\n"
                elif command.upper() == b"AUTH XOAUTH2":
                    writer.write(b"+ \r\n")
                    await writer.drain()
                    response = (await reader.readline()).rstrip(b"\r\n")
                    self.commands.append(response)
                    out = b"+OK signed in\r\n" if response == self.expected else b"-ERR [AUTH] no\r\n"
                elif command.upper().startswith(b"AUTH XOAUTH2 "):
                    out = b"+OK signed in\r\n" if command[13:] == self.expected else b"-ERR [AUTH] no\r\n"
                else:
                    out = self._default(command.partition(b" ")[0].upper(), b"")
                writer.write(out)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("token_length", [40, 1200], ids=["short", "long"])
async def test_an_xoauth2_response_too_long_for_the_auth_line_follows_an_empty_challenge(token_length: int) -> None:
    """An XOAUTH2 initial response (a token of a thousand characters or more is usual) would make
    the AUTH command longer than 255 octets, which RFC 5034 forbids; it then follows the server's
    empty challenge instead.  A short one stays on the AUTH line (one round trip)."""
    token = base64.urlsafe_b64encode(b"t" * token_length).decode()
    expected = xoauth2_initial_response("user@example.com", token)
    server = SaslServer(expected)
    async with loopback_server(server.handle) as port:
        client = await connect(port)
        try:
            await client.authenticate_xoauth2("user@example.com", token)
        finally:
            await client.close()
    sent = [c for c in server.commands if c.upper().startswith(b"AUTH")]
    assert all(len(c) <= 255 for c in sent)
    assert sent == ([b"AUTH XOAUTH2 " + expected + b"\r\n"] if token_length < 100 else [b"AUTH XOAUTH2\r\n"])


# ---- UIDL ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [b"x" * 201, b"has space", "caf\u00e9".encode()], ids=["201-chars", "space", "8-bit"])
async def test_one_uidl_outside_rfc_1939_leaves_out_its_message_only(settings, registry, org, pool, publisher,
                                                                     bad: bytes) -> None:
    """One UIDL line that breaks RFC 1939 (1-70 printable characters; 200 are taken): before, UIDL
    failed, and with it every session, so nothing of the maildrop was ever ingested.  Now that
    message is left out, with a warning naming it, and the others are synced."""
    mailbox = await new_mailbox(registry, org)
    server = Pop3Server([(b"a", msg(1)), (bad, msg(2)), (b"c", msg(3))])
    async with loopback_server(server.handle) as port:
        client = await connect(port)
        try:
            await client.login("u", "p")
            assert await client.uidl() == {1: "a", 3: "c"}
            assert client.untracked_uidl_lines == ["message 2"]
        finally:
            await client.close()
        sync, failure = await session(port, pool, publisher, mailbox)
    assert failure is None, failure
    assert [(code, "message 2" in text) for code, text in sync.warnings] == [("uidl_unusable", True)]
    events = await read_topic(settings, EMAIL_RECEIVED.name, 2, timeout=5)
    assert sorted(e["data"]["uidl"] for e in events) == ["a", "c"]


async def test_a_uidl_listing_with_no_usable_line_is_a_protocol_error() -> None:
    """No line usable at all: the server's UIDL is broken, not a message of it (alert and back-off)."""
    server = Pop3Server([(b"x" * 201, msg(1)), (b"y" * 300, msg(2))])
    async with loopback_server(server.handle) as port:
        client = await connect(port)
        try:
            await client.login("u", "p")
            with pytest.raises(ConduitError) as caught:
                await client.uidl()
        finally:
            await client.close()
    assert caught.value.reason == "protocol_error" and "message 1, message 2" in caught.value.message


# ---- STLS ----------------------------------------------------------------------------------------


async def test_what_comes_after_stls_ok_before_the_handshake_is_never_read_inside_tls() -> None:
    """RFC 2595 section 3.1 (the plaintext injection of CVE-2011-0411): replies a server, or a
    man in the middle, sends after STLS's +OK in the same read are dropped, not taken as CAPA's."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK ready\r\n")
        await writer.drain()
        while line := await reader.readline():
            if line.startswith(b"CAPA"):
                writer.write(b"+OK\r\nSTLS\r\nUIDL\r\n.\r\n")
            elif line.startswith(b"STLS"):
                writer.write(b"+OK begin\r\n+OK\r\nINJECTED\r\n.\r\n")
                await writer.drain()
                await writer.start_tls(server_ctx)
                await reader.readline()   # CAPA, inside TLS
                writer.write(b"+OK\r\nREAL\r\n.\r\n")
                await writer.drain()
                break
            await writer.drain()
        await reader.read()
        writer.close()

    async with loopback_server(handle) as port:
        client = await Pop3Client.connect("127.0.0.1", port, tls="starttls", ssl_context=client_ctx, timeout=3)
        capabilities = client.capabilities
        await client.close()
    assert capabilities == {"REAL"}
