"""Conduit's IMAP client against a real Dovecot (conduit.peers.dovecot) and a few scripted servers.

The scripted servers (asyncio, in this file) cover what Dovecot will not do on demand: a greeting
that never comes, a BYE, and responses dribbled out a few bytes at a time with untagged responses
between tagged ones.  Pure syntax helpers (XOAUTH2, modified UTF-7, sequence sets) are tested with
plain data at the top.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest

from conduit.peers import free_port
from services.ingest.imap_client import (
    FetchedMessage,
    ImapClient,
    KnownFolder,
    _fetched_message_general,
    decode_mailbox_name,
    encode_mailbox_name,
    parse_internaldate,
    parse_tokens,
    parse_uid_set,
    sequence_set,
)
from services.ingest.wire import MailConnection
from services.ingest.sasl import xoauth2_initial_response
from shared.errors import AuthenticationFailed, ConnectionFailed, InvalidInput, ProtocolTimeout, TlsFailed
from tests.support.loopback import loopback_server

PASSWORD = "secret-pw-1"


# -- plain-data tests ----------------------------------------------------------------------------


def test_xoauth2_initial_response_has_googles_format():
    raw = base64.b64decode(xoauth2_initial_response("alice@example.com", "ya29.token"))
    assert raw == b"user=alice@example.com\x01auth=Bearer ya29.token\x01\x01"


@pytest.mark.parametrize("user,token", [("a\x01b", "tok-123"), ("a", "tok-123\r\nx"), ("", "tok-123"), ("a", "")])
def test_xoauth2_refuses_values_that_would_forge_fields(user, token):
    with pytest.raises(InvalidInput) as caught:
        xoauth2_initial_response(user, token)
    assert "tok-123" not in str(caught.value)


@pytest.mark.parametrize("name,encoded", [
    ("INBOX", "INBOX"), ("Café Paris", "Caf&AOk- Paris"), ("A&B", "A&-B"),
    ("日本語", "&ZeVnLIqe-"), ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
])
def test_modified_utf7_round_trip(name, encoded):
    assert encode_mailbox_name(name) == encoded
    assert decode_mailbox_name(encoded) == name


def test_sequence_set_compresses_runs():
    assert sequence_set([1, 2, 3, 7, 9, 10, 11]) == b"1:3,7,9:11"
    assert sequence_set([5]) == b"5"


def test_uid_sets_read_into_ranges():
    assert parse_uid_set(b"7,1:3,10:9") == ((1, 3), (7, 7), (9, 10))
    assert parse_uid_set(b"4294967295") == ((4294967295, 4294967295),)
    assert parse_uid_set(b"5:*,x,2") == ((2, 2),)      # "*" and junk are no UIDs


def test_tokens_keep_literals_and_quoted_strings_apart_from_atoms():
    tokens = parse_tokens(b'(UID 7 FLAGS (\\Seen $Label) INTERNALDATE " 7-Jul-1996 02:44:25 -0700" '
                          b'BODY[HEADER.FIELDS (FROM)] {3} X "a\\"b")', [b"abc"])
    assert tokens == [["UID", "7", "FLAGS", ["\\Seen", "$Label"], "INTERNALDATE",
                       b" 7-Jul-1996 02:44:25 -0700", "BODY[HEADER.FIELDS (FROM)]", b"abc", "X", b'a"b']]
    assert parse_internaldate(b" 7-Jul-1996 02:44:25 -0700").isoformat() == "1996-07-07T02:44:25-07:00"


# -- a real Dovecot ------------------------------------------------------------------------------


def unique_address() -> str:
    return f"i{uuid.uuid4().hex[:10]}@example.com"


def tricky_message(i: int) -> bytes:
    """A message whose body looks like IMAP protocol and carries 8-bit bytes."""
    return (
        f"From: sender@example.org\r\nTo: rcpt@example.com\r\nSubject: tricky {i}\r\n"
        f"Message-ID: <tricky-{i}-{uuid.uuid4().hex}@example.org>\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        f"* {i} FETCH (UID {i} BODY[] {{12}}\r\n"
        "C1 OK UID FETCH completed\r\n"
        ")\r\n"
        "{5}\r\n"
        ".\r\n"
        "..two dots\r\n"
        "* BYE not really\r\n"
        "+ idling\r\n"
        "Grüße aus Köln – 8-bit data ✓\r\n"
    ).encode("utf-8") + bytes(range(0x80, 0x100)) + b"\r\n" + b"x" * (i * 37 % 3000) + b"\r\n"


def plain_message(i: int, size: int = 1500) -> bytes:
    head = f"From: a@example.org\r\nSubject: m{i}\r\nMessage-ID: <m{i}-{uuid.uuid4().hex}@x>\r\n\r\n".encode()
    return head + (b"line of text %d\r\n" % i) * (size // 20)


@pytest.fixture
def dovecot(tls_dovecot):
    """The session's TLS Dovecot (tests/integration/conftest.py); tests add their own users."""
    return tls_dovecot


@pytest.fixture
async def mailbox(dovecot):
    """A fresh user; yields its address."""
    address = unique_address()
    dovecot.add_user(address, PASSWORD)
    return address


async def connected(dovecot, address: str, **kwargs) -> ImapClient:
    client = await ImapClient.connect(dovecot.host, dovecot.imap_port, tls="none", ssl_context=None, **kwargs)
    await client.login(address, PASSWORD)
    return client


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.02)


pytestmark = pytest.mark.peers


async def test_login_ok_reports_capabilities(dovecot, mailbox):
    client = await connected(dovecot, mailbox)
    try:
        assert {"IMAP4REV1", "IDLE", "UIDPLUS", "CONDSTORE"} <= client.capabilities
        assert "INBOX" in await client.list_folders()
    finally:
        await client.logout()


async def test_wrong_password_is_authentication_failed_without_the_password(dovecot, mailbox):
    client = await ImapClient.connect(dovecot.host, dovecot.imap_port, tls="none", ssl_context=None)
    try:
        with pytest.raises(AuthenticationFailed) as caught:
            await client.login(mailbox, "Wrong-Pass-XYZ")
        assert "Wrong-Pass-XYZ" not in str(caught.value)
        assert mailbox in str(caught.value)
    finally:
        await client.close()


@pytest.mark.parametrize("password", ['p a"s\\s{3}', "pässwörd-ünïcode", "}{\\\"*%"])
async def test_passwords_needing_quoting_or_literals(dovecot, password):
    address = unique_address()
    dovecot.add_user(address, password)
    client = await ImapClient.connect(dovecot.host, dovecot.imap_port, tls="none", ssl_context=None)
    try:
        await client.login(address, password)
        state = await client.select("INBOX")
        assert state.exists == 0
    finally:
        await client.logout()


async def test_fetch_returns_the_delivered_bytes(dovecot, mailbox):
    delivered = [tricky_message(i) for i in range(60)]
    dovecot.deliver_many(mailbox, delivered)
    client = await connected(dovecot, mailbox)
    try:
        state = await client.select("INBOX")
        assert state.exists == 60 and state.uidvalidity > 0 and state.uidnext == 61
        assert state.highestmodseq is None        # CONDSTORE not enabled
        uids = await client.uids_since(0)
        assert uids == list(range(1, 61))
        fetched = [m async for m in client.fetch(uids, chunk=7)]
        assert sorted(m.raw for m in fetched) == sorted(delivered)
        assert [m.uid for m in fetched] == uids
        assert all(m.internaldate is not None and m.internaldate.tzinfo for m in fetched)
        assert all(isinstance(m.flags, tuple) and m.modseq is None for m in fetched)
        headers = [m async for m in client.fetch_headers(uids[:3])]
        assert [h.raw for h in headers] == [f.raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" for f in fetched[:3]]
    finally:
        await client.logout()


async def test_uids_since_filters_the_star_quirk(dovecot, mailbox):
    dovecot.deliver_many(mailbox, [plain_message(i) for i in range(5)])
    client = await connected(dovecot, mailbox)
    try:
        await client.select("INBOX")
        assert await client.uids_since(5) == []      # "6:*" matches UID 5: filtered out
        assert await client.uids_since(3) == [4, 5]
    finally:
        await client.logout()


async def test_chunked_fetch_of_many_messages(dovecot, mailbox):
    delivered = [plain_message(i, 2000) for i in range(2500)]
    dovecot.deliver_many(mailbox, delivered)
    client = await connected(dovecot, mailbox)
    try:
        await client.select("INBOX")
        uids = await client.uids_since(0)
        assert len(uids) == 2500
        fetched = {m.uid: m.raw async for m in client.fetch(uids, chunk=300)}
        assert sorted(fetched.values()) == sorted(delivered)
        # a scattered UID list goes out as compressed ranges and comes back exactly
        scattered = uids[::3] + uids[1:40]
        again = [m.uid async for m in client.fetch(scattered, chunk=200)]
        assert again == sorted(set(scattered))
    finally:
        await client.logout()


async def test_leaving_a_fetch_early_keeps_the_session_usable(dovecot, mailbox):
    dovecot.deliver_many(mailbox, [plain_message(i) for i in range(1200)])
    client = await connected(dovecot, mailbox)
    try:
        await client.select("INBOX")
        async with contextlib.aclosing(client.fetch(range(1, 1201), chunk=100)) as messages:
            async for message in messages:
                if message.uid == 150:
                    break
        assert await client.uids_since(1198) == [1199, 1200]
    finally:
        await client.logout()


async def test_condstore_modseq_and_changed_uids(dovecot, mailbox):
    dovecot.deliver_many(mailbox, [plain_message(i) for i in range(4)])
    client = await connected(dovecot, mailbox)
    try:
        assert await client.enable_condstore() is True
        state = await client.select("INBOX", readonly=False)
        assert isinstance(state.highestmodseq, int) and state.highestmodseq > 0
        messages = [m async for m in client.fetch([1, 2, 3, 4])]
        assert all(isinstance(m.modseq, int) for m in messages)
        await client.add_flags([3], ["\\Flagged"])
        assert await client.uids_changed_since(state.highestmodseq) == [3]
        assert (await client.select("INBOX")).highestmodseq > state.highestmodseq
    finally:
        await client.logout()


async def test_qresync_select_reports_what_vanished_and_changed(dovecot, mailbox):
    dovecot.deliver_many(mailbox, [plain_message(i) for i in range(6)])
    client = await connected(dovecot, mailbox)
    try:
        assert await client.enable_quick_resync() == "QRESYNC"
        assert await client.enable_quick_resync() == "QRESYNC"      # once per session: no second ENABLE
        first = await client.select("INBOX")
        assert first.highestmodseq and not first.quick_resync and first.vanished == ()

        def elsewhere() -> None:
            with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
                imap.login(mailbox, PASSWORD)
                imap.select("INBOX")
                imap.uid("STORE", "2:4", "+FLAGS.SILENT", "(\\Deleted)")
                imap.expunge()
                imap.uid("STORE", "6", "+FLAGS.SILENT", "(\\Seen)")
                imap.logout()

        await asyncio.to_thread(elsewhere)
        assert await client.noop() is True            # VANISHED (not EXPUNGE) reached the selected folder
        again = await client.select("INBOX", known=KnownFolder(first.uidvalidity, first.highestmodseq, 6))
        assert again.quick_resync and again.highestmodseq > first.highestmodseq
        assert again.vanished == ((2, 4),) and again.changed == (6,) and again.exists == 3
        # Known UIDs 1:5: the server leaves out news of UID 6 (mail this client has not seen yet).
        partial = await client.select("INBOX", known=KnownFolder(first.uidvalidity, first.highestmodseq, 5))
        assert partial.vanished == ((2, 4),) and partial.changed == ()
        stale = await client.select("INBOX", known=KnownFolder(first.uidvalidity + 1, first.highestmodseq, 5))
        assert not stale.quick_resync and stale.vanished == () and stale.changed == ()
        unchanged = await client.select("INBOX", known=KnownFolder(again.uidvalidity, again.highestmodseq, 6))
        assert unchanged.quick_resync and unchanged.vanished == () and unchanged.changed == ()
    finally:
        await client.logout()


async def test_idle_wakes_on_append_and_times_out(dovecot, mailbox):
    client = await connected(dovecot, mailbox)
    try:
        await client.select("INBOX")
        started = time.monotonic()
        assert await client.idle(0.6) is False
        assert time.monotonic() - started >= 0.55
        await client.noop()                               # still in step after DONE

        waiting = asyncio.create_task(client.idle(20))
        await wait_for(lambda: client.idling)             # the APPEND must come after "+ idling"
        appended_at = time.monotonic()
        uid = await dovecot.append(mailbox, PASSWORD, plain_message(1))
        assert await asyncio.wait_for(waiting, 10) is True
        assert time.monotonic() - appended_at < 2.0       # Dovecot notifies within ~1 s here
        assert await client.uids_since(0) == [uid]
    finally:
        await client.logout()


async def test_mark_deleted_and_uid_expunge_remove_only_those(dovecot, mailbox):
    dovecot.deliver_many(mailbox, [plain_message(i) for i in range(5)])
    client = await connected(dovecot, mailbox)
    try:
        await client.select("INBOX", readonly=False)
        await client.mark_deleted([2, 4])
        await client.expunge([2])                         # UIDPLUS: 4 stays, flagged
        assert await client.uids_since(0) == [1, 3, 4, 5]
        flags = {m.uid: m.flags async for m in client.fetch([4])}
        assert "\\Deleted" in flags[4]
        await wait_for(lambda: dovecot.message_count(mailbox) == 4)
    finally:
        await client.logout()


async def test_folder_names_in_modified_utf7_and_quotes(dovecot, mailbox):
    def create_folders() -> None:
        with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
            imap.login(mailbox, PASSWORD)
            for name in ('"Caf&AOk- Paris"', '"Say \\"hi\\""', "&ZeVnLIqe-"):
                typ, data = imap.create(name)
                assert typ == "OK", data
            imap.logout()

    await asyncio.to_thread(create_folders)
    client = await connected(dovecot, mailbox)
    try:
        folders = await client.list_folders()
        assert {"INBOX", "Café Paris", 'Say "hi"', "日本語"} <= set(folders)
        for name in ("Café Paris", 'Say "hi"', "日本語"):
            assert (await client.select(name)).exists == 0
    finally:
        await client.logout()


async def test_implicit_tls_and_starttls_verify_with_the_ca(dovecot, mailbox, tls):
    for mode, port in (("implicit", dovecot.imaps_port), ("starttls", dovecot.imap_port)):
        client = await ImapClient.connect(dovecot.host, port, tls=mode, ssl_context=tls["client"])
        try:
            assert "STARTTLS" not in client.capabilities
            await client.login(mailbox, PASSWORD)
            await client.select("INBOX")
        finally:
            await client.logout()


async def test_tls_without_the_ca_is_tls_failed(dovecot):
    for mode, port in (("implicit", dovecot.imaps_port), ("starttls", dovecot.imap_port)):
        with pytest.raises(TlsFailed) as caught:
            await ImapClient.connect(dovecot.host, port, tls=mode, ssl_context=None, timeout=10)
        assert "certificate" in str(caught.value)


async def test_connection_refused_is_connection_failed():
    with pytest.raises(ConnectionFailed):
        await ImapClient.connect("127.0.0.1", free_port(), tls="none", ssl_context=None, timeout=5)


# -- scripted servers ----------------------------------------------------------------------------


Send = Callable[[bytes], Awaitable[None]]


async def answer_commands(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, greeting: bytes,
                          answer: Callable[[bytes, bytes, Send], Awaitable[None]], *, send: Send | None = None) -> None:
    """A scripted server's command loop: greet, hand each command to ``answer(tag, command, send)``
    until LOGOUT (answered here), then close.  ``send`` writes and drains (or dribbles)."""
    async def write(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    send = send or write
    await send(greeting)
    while line := await reader.readline():
        tag, command = line.split(b" ", 1)
        if command.startswith(b"LOGOUT"):
            await send(b"* BYE bye\r\n" + tag + b" OK\r\n")
            break
        await answer(tag, command, send)
    writer.close()


async def test_silent_server_is_protocol_timeout():
    hold = asyncio.Event()

    async def silent(reader, writer):
        await hold.wait()
        writer.close()

    async with loopback_server(silent) as port:
        with pytest.raises(ProtocolTimeout):
            await ImapClient.connect("127.0.0.1", port, tls="none", ssl_context=None, timeout=0.3)
        hold.set()


async def test_bye_greeting_is_connection_failed():
    async def bye(reader, writer):
        writer.write(b"* BYE Too many connections\r\n")
        await writer.drain()
        writer.close()

    async with loopback_server(bye) as port:
        with pytest.raises(ConnectionFailed, match="Too many connections"):
            await ImapClient.connect("127.0.0.1", port, tls="none", ssl_context=None, timeout=5)


async def test_responses_split_into_tiny_reads_with_untagged_between():
    body = b"Subject: x\r\n\r\nA001 OK fake\r\n* 9 EXISTS\r\n"

    async def dribble(writer, data: bytes) -> None:
        for i in range(0, len(data), 3):      # three bytes per TCP write, each drained
            writer.write(data[i:i + 3])
            await writer.drain()

    async def answer(tag, command, send):
        if command.startswith(b"LOGIN"):
            await send(tag + b" OK logged in\r\n")
        elif command.startswith(b"CAPABILITY"):    # the LOGIN reply did not announce them
            await send(b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK\r\n")
        elif command.startswith(b"UID FETCH"):
            await send(b"* 1 FETCH (UID 10 FLAGS (\\Seen) BODY[] {%d}\r\n" % len(body) + body
                       + b" INTERNALDATE \"01-Feb-2024 10:00:00 +0000\")\r\n* 2 EXISTS\r\n"
                       + b"* 2 FETCH (FLAGS (\\Seen))\r\n"
                       + b"* 2 FETCH (BODY[] {0}\r\n UID 11)\r\n" + tag + b" OK done\r\n")

    async def server(reader, writer):
        await answer_commands(reader, writer, b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n", answer,
                              send=lambda data: dribble(writer, data))

    async with loopback_server(server) as port:
        client = await ImapClient.connect("127.0.0.1", port, tls="none", ssl_context=None, timeout=5)
        await client.login("u", "p")
        messages = [m async for m in client.fetch([10, 11])]
        assert [(m.uid, m.raw, m.flags) for m in messages] == [(10, body, ("\\Seen",)), (11, b"", ())]
        assert messages[0].internaldate.isoformat() == "2024-02-01T10:00:00+00:00"
        assert await client.idle(5) is True       # the EXISTS during the fetch is not lost
        await client.logout()


async def _qresync_server(reader, writer, *, enabled: bytes, seen: list[bytes]) -> None:
    """A QRESYNC server whose second EXAMINE is answered with the previous folder's news first."""
    caps = b"IMAP4rev1 ENABLE CONDSTORE QRESYNC IDLE"

    async def answer(tag, command, send):
        seen.append(tag + b" " + command)
        if command.startswith(b"LOGIN"):
            await send(tag + b" OK [CAPABILITY " + caps + b"] logged in\r\n")
        elif command.startswith(b"ENABLE"):
            await send(tag + b" NO not now\r\n" if enabled == b"NO" else enabled + tag + b" OK enabled\r\n")
        elif command.startswith(b'EXAMINE "INBOX"'):
            await send(b"* 10 EXISTS\r\n* OK [UIDVALIDITY 7] x\r\n* OK [UIDNEXT 11] x\r\n"
                       b"* OK [HIGHESTMODSEQ 20] x\r\n" + tag + b" OK [READ-ONLY] done\r\n")
        elif command.startswith(b'EXAMINE "Other"'):
            await send(b"* VANISHED 4\r\n* 9 FETCH (UID 9 FLAGS (\\Seen) MODSEQ (21))\r\n"   # about INBOX
                       b"* OK [CLOSED] INBOX closed\r\n* 5 EXISTS\r\n* OK [UIDVALIDITY 9] x\r\n"
                       b"* OK [UIDNEXT 9] x\r\n* OK [HIGHESTMODSEQ 33] x\r\n* VANISHED (EARLIER) 6,2:3\r\n"
                       b"* 1 FETCH (UID 1 FLAGS (\\Seen) MODSEQ (32))\r\n" + tag + b" OK [READ-ONLY] done\r\n")

    await answer_commands(reader, writer, b"* OK [CAPABILITY " + caps + b"] ready\r\n", answer)


async def test_qresync_answers_count_only_after_closed():
    seen: list[bytes] = []
    async with loopback_server(lambda r, w: _qresync_server(r, w, enabled=b"* ENABLED QRESYNC\r\n", seen=seen)) as port:
        client = await ImapClient.connect("127.0.0.1", port, tls="none", ssl_context=None, timeout=5)
        await client.login("u", "p")
        assert await client.enable_quick_resync() == "QRESYNC"
        await client.select("INBOX")
        other = await client.select("Other", known=KnownFolder(9, 30, 8))
        assert seen[-1] == b'C4 EXAMINE "Other" (QRESYNC (9 30 1:8))\r\n'
        assert (other.uidvalidity, other.uidnext, other.exists, other.highestmodseq) == (9, 9, 5, 33)
        # UID 4 vanished and UID 9 changed in INBOX, before [CLOSED]: not Other's news.
        assert other.quick_resync and other.vanished == ((2, 3), (6, 6)) and other.changed == (1,)
        await client.logout()


@pytest.mark.parametrize("answer", [b"", b"NO"], ids=["ok-without-enabled", "refused"])
async def test_an_enable_that_enables_nothing_leaves_qresync_off(answer: bytes):
    seen: list[bytes] = []
    async with loopback_server(lambda r, w: _qresync_server(r, w, enabled=answer, seen=seen)) as port:
        client = await ImapClient.connect("127.0.0.1", port, tls="none", ssl_context=None, timeout=5)
        await client.login("u", "p")
        assert await client.enable_quick_resync() is None     # no "* ENABLED ...": the plain path
        assert await client.enable_quick_resync() is None     # and it is not asked again
        assert [line.split(b" ", 1)[1] for line in seen[1:]] == [b"ENABLE QRESYNC\r\n", b"ENABLE CONDSTORE\r\n"]
        assert not client.qresync_enabled and not client.condstore_enabled
        other = await client.select("Other", known=KnownFolder(9, 30, 8))
        assert seen[-1] == b'C4 EXAMINE "Other"\r\n', "no QRESYNC parameters without QRESYNC enabled"
        assert not other.quick_resync and other.vanished == ()
        await client.logout()


# -- the FETCH fast path (responses read straight from the receive buffer) -------------------------


class _Captured:
    """Stands for the socket under a ``MailConnection``: replays captured bytes, ``piece`` at a time."""

    def __init__(self, data: bytes, piece: int) -> None:
        self._data, self._piece, self._at = data, piece, 0

    async def read(self, size: int) -> bytes:
        chunk = self._data[self._at:self._at + min(size, self._piece)]
        self._at += len(chunk)
        return chunk

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass


def fed_client(data: bytes, piece: int = 1 << 30) -> ImapClient:
    """A client whose connection reads ``data`` (no socket): for parsing captured responses."""
    captured = _Captured(data, piece)
    return ImapClient(MailConnection(captured, captured, protocol="IMAP", host="test", timeout=5), "test", 5)


async def general_parse(responses: bytes) -> list[FetchedMessage]:
    """The messages in ``responses`` as the general reader and tokeniser see them."""
    client = fed_client(responses + b"T1 OK done\r\n")
    messages = []
    while True:
        text, literals = await client._read_response()
        if text.startswith(b"T1 "):
            return messages
        if text[:2] == b"* " and (literals or b"BODY[" in text):
            message = _fetched_message_general(text, literals)
            if isinstance(message, FetchedMessage):
                messages.append(message)


async def raw_fetch_answer(dovecot, address: str, commands: list[bytes]) -> bytes:
    """Run ``commands`` (the last a UID FETCH) on a bare socket and return the fetch's answer bytes:
    its untagged responses exactly as Dovecot sent them."""
    reader, writer = await asyncio.open_connection(dovecot.host, dovecot.imap_port)
    try:
        async with asyncio.timeout(30):
            await reader.readline()
            for i, command in enumerate([b'LOGIN "%s" "%s"' % (address.encode(), PASSWORD.encode())] + commands):
                tag = b"ZQ%d " % i
                writer.write(tag + command + b"\r\n")
                answer = b""
                while not (answer.endswith(b"\r\n") and (answer.startswith(tag) or b"\r\n" + tag in answer)):
                    answer += await reader.read(65536)
                assert answer[answer.rindex(tag):].startswith(tag + b"OK"), answer[-200:]
        return answer[:answer.rindex(tag)]
    finally:
        writer.close()


@pytest.mark.parametrize("condstore", [False, True], ids=["plain", "condstore"])
async def test_fast_fetch_reading_equals_the_general_parser_on_dovecot_answers(dovecot, mailbox, condstore):
    delivered = [tricky_message(i) if i % 3 else plain_message(i, 50 + i * 97) for i in range(120)]
    delivered[7] = b""                                      # an empty message: a {0} literal
    dovecot.deliver_many(mailbox, delivered)
    modseq = b" MODSEQ" if condstore else b""
    answer = await raw_fetch_answer(dovecot, mailbox, [
        b"SELECT INBOX",
        b"UID STORE 2:9 +FLAGS.SILENT (\\Seen $Label1 Junk)", b"UID STORE 5 +FLAGS.SILENT (\\Flagged \\Answered)",
        b"UID FETCH 1:* (UID FLAGS INTERNALDATE BODY.PEEK[]" + modseq + b")"])
    assert answer.count(b" FETCH (UID ") >= 120

    # With CONDSTORE turned on by this FETCH, Dovecot first says "* OK [HIGHESTMODSEQ n]".
    fetches = answer[answer.index(b"* 1 FETCH "):]
    client = fed_client(fetches + b"C1 OK done\r\n")
    while client._conn.buffered() < len(fetches):
        await client._conn.fill()
    fast, incomplete = client._take_usual_fetches()
    assert not incomplete and await client._conn.next_bytes_are(b"C1 OK"), "every FETCH took the fast path"
    assert fast == await general_parse(answer)
    assert len(fast) == 120 and sorted(m.raw for m in fast) == sorted(delivered)
    assert fast[4].flags == ("\\Flagged", "\\Answered", "\\Seen", "\\Recent", "$Label1", "Junk") or \
        set(fast[4].flags) == {"\\Flagged", "\\Answered", "\\Seen", "\\Recent", "$Label1", "Junk"}
    assert all((m.modseq is not None) == condstore for m in fast)
    # The same bytes through fetch(), arriving a few KB at a time: heads and literals cut anywhere.
    for piece in (4099, 65536):
        dribbled = fed_client(answer + b"C1 OK done\r\n", piece)
        assert [m async for m in dribbled.fetch(range(1, 121))] == fast   # one command: the answer is its


def _usual(uid: int, body: bytes, flags: bytes = b"\\Seen", modseq: bytes = b" MODSEQ (5)") -> bytes:
    return (b'* %d FETCH (UID %d FLAGS (%s) INTERNALDATE "01-Feb-2024 10:00:00 +0100"%s BODY[] {%d}\r\n'
            % (uid, uid, flags, modseq, len(body)) + body + b")\r\n")


BODY = b"Subject: x\r\n\r\n* 3 FETCH (UID 3 BODY[] {2}\r\nC1 OK fake\r\n)\r\n"
BIG = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * 40000         # 640 KB: more than one read
# Each case: the answer's TCP writes, and how many of its messages the fast path should read.
FAST_PATH_CASES = {
    "usual": (2, [_usual(10, BODY), _usual(11, b"", modseq=b"")]),
    "other-order": (0, [b'* 1 FETCH (UID 10 BODY[] {%d}\r\n' % len(BODY) + BODY
                    + b' FLAGS (\\Seen) INTERNALDATE "01-Feb-2024 10:00:00 +0000")\r\n']),
    "items-after-the-literal": (0, [_usual(10, BODY)[:-3] + b" MODSEQ (7))\r\n"]),
    "body-nil": (1, [b'* 1 FETCH (UID 10 FLAGS () INTERNALDATE "01-Feb-2024 10:00:00 +0000" BODY[] NIL)\r\n',
                     _usual(11, BODY)]),
    "flags-with-backslashes": (1, [_usual(10, BODY, flags=b"\\Seen \\Flagged $Label1 \\*"),
                                   _usual(11, BODY, flags=b'\\Seen "quoted"'),
                                   _usual(12, BODY, flags=b"\\Seen [bracket]")]),
    "flags-only-fetch": (2, [_usual(10, BODY), b"* 4 FETCH (UID 12 FLAGS (\\Deleted))\r\n", _usual(11, BODY)]),
    "lower-case-items": (0, [_usual(10, BODY).replace(b"FLAGS", b"flags")]),
    "literal-split-across-reads": (2, [_usual(10, BODY)[:-30], _usual(10, BODY)[-30:] + _usual(11, BODY)[:20],
                                       _usual(11, BODY)[20:]]),
    "bigger-than-the-read-buffer": (2, [_usual(10, BIG), _usual(11, BODY)]),
    "big-and-split": (1, [_usual(10, BIG)[:300_000], _usual(10, BIG)[300_000:]]),
}


async def _fetch_server(reader, writer, *, chunks: list[bytes]) -> None:
    """Answers UID FETCH with ``chunks``, each its own TCP write, drained, with a pause between."""
    async def answer(tag, command, send):
        if command.startswith(b"LOGIN"):
            await send(tag + b" OK [CAPABILITY IMAP4rev1 IDLE] logged in\r\n")
        elif command.startswith(b"UID FETCH"):
            for chunk in chunks:
                await send(chunk)
                await asyncio.sleep(0.02)   # separate TCP writes, as a server's would be
            await send(tag + b" OK done\r\n")

    await answer_commands(reader, writer, b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n", answer)


@pytest.mark.parametrize("case", list(FAST_PATH_CASES))
async def test_fetch_reads_usual_and_unusual_answers_like_the_general_parser(case):
    fast_count, chunks = FAST_PATH_CASES[case]
    expected = await general_parse(b"".join(chunks))
    async with loopback_server(lambda r, w: _fetch_server(r, w, chunks=chunks)) as port:
        client = await ImapClient.connect("127.0.0.1", port, tls="none", ssl_context=None, timeout=5)
        await client.login("u", "p")
        fast: list[FetchedMessage] = []
        take = client._take_usual_fetches

        def counted() -> tuple[list[FetchedMessage], bool]:
            messages, incomplete = take()
            fast.extend(messages)
            return messages, incomplete

        client._take_usual_fetches = counted
        messages = [m async for m in client.fetch([10, 11, 12])]
        assert messages == expected and messages
        assert len(fast) == fast_count, "the fast path read what it should, and only that"
        if case == "flags-only-fetch":
            assert await client.idle(5) is True          # the flag update is a change, not a message
        await client.logout()
    by_uid = {m.uid: m for m in messages}
    if case == "body-nil":
        assert 10 not in by_uid and by_uid[11].raw == BODY      # NIL is no message, not an empty one
    elif case in ("bigger-than-the-read-buffer", "big-and-split"):
        assert by_uid[10].raw == BIG
    elif case == "flags-with-backslashes":
        assert by_uid[10].flags == ("\\Seen", "\\Flagged", "$Label1", "\\*")
    else:
        assert by_uid[10].raw == BODY and by_uid[10].internaldate is not None


# -- answers without the message's content ---------------------------------------------------------


def _nil(number: int, uid: int, flags: bytes = b"") -> bytes:
    return b'* %d FETCH (UID %d FLAGS (%s) INTERNALDATE "01-Feb-2024 10:00:00 +0000" BODY[] NIL)\r\n' % (number, uid, flags)


# UID FETCH 10:18 answered OK.  The sequence numbers are the folder's (13 was expunged before).
WITHOUT_CONTENT = [
    _usual(10, BODY),
    _nil(2, 11),                                           # refused: NIL is no message
    b"* 3 FETCH (UID 12 FLAGS (\\Seen))\r\n",              # refused: a UID we asked for, never its body
    _nil(4, 14, b"\\Deleted"),                             # expunged below (Dovecot's answer for it)
    b"* 5 FETCH (UID 15 FLAGS (\\Seen))\r\n", _usual(15, BODY),   # its items in two responses: served
    _nil(6, 16, b"\\Deleted"),                             # expunged below, once renumbered
    b"* 7 FETCH (UID 99 FLAGS (\\Seen))\r\n",              # not asked for: an unsolicited flag update
    b"* 1 FETCH (UID 10 FLAGS (\\Seen \\Flagged))\r\n",    # a flag update of a message served
    _nil(8, 18),                                           # refused, though renumbered to 6 below
]
GONE = {"expunge": b"* 4 EXPUNGE\r\n* 5 EXPUNGE\r\n",   # 14, then 16 (number 6 became 5)
        "vanished": b"* VANISHED 14,16\r\n"}


@pytest.mark.parametrize("gone", list(GONE))
async def test_fetch_servable_refuses_uids_answered_without_content_but_not_uids_gone(gone):
    """A UID FETCH answered OK whose response for a UID carries no content refuses that UID (it was
    an empty message, stored and published); a UID absent from the answer, or expunged during it,
    is gone, not refused."""
    async with loopback_server(lambda r, w: _fetch_server(r, w, chunks=WITHOUT_CONTENT + [GONE[gone]])) as port:
        client = await ImapClient.connect("127.0.0.1", port, tls="none", ssl_context=None, timeout=5)
        await client.login("u", "p")
        refused: dict[int, str] = {}
        served = [m async for messages in client.fetch_servable(range(10, 19), refused) for m in messages]
        assert [(m.uid, m.raw) for m in served] == [(10, BODY), (15, BODY)]
        assert sorted(refused) == [11, 12, 18]
        assert refused[11].endswith("answered UID FETCH without the message's content (BODY[] NIL).")
        assert refused[12].endswith("without the message's content (no BODY[] in its FETCH response).")
        # The plain fetch leaves them out too: no empty message in place of one not served.
        assert [m.uid async for m in client.fetch(range(10, 19))] == [10, 15]
        await client.logout()


@pytest.mark.parametrize("qresync", [False, True], ids=["expunge", "vanished"])
async def test_a_message_expunged_after_the_search_is_gone_not_refused(dovecot, mailbox, qresync):
    """Dovecot answers ``BODY[] NIL`` for a message another session expunged between our SEARCH and
    FETCH, then reports the expunge (EXPUNGE, or VANISHED with QRESYNC) before ``OK [EXPUNGEISSUED]``:
    neither an (empty) message nor a refusal."""
    dovecot.deliver_many(mailbox, [plain_message(i) for i in range(5)])
    client = await connected(dovecot, mailbox)
    try:
        if qresync:
            assert await client.enable_quick_resync() == "QRESYNC"
        await client.select("INBOX")
        uids = await client.uids_since(0)

        def expunge_elsewhere() -> None:
            with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
                imap.login(mailbox, PASSWORD)
                imap.select("INBOX")
                imap.uid("STORE", "3", "+FLAGS.SILENT", "(\\Deleted)")
                imap.expunge()
                imap.logout()

        await asyncio.to_thread(expunge_elsewhere)
        refused: dict[int, str] = {}
        served = [m async for messages in client.fetch_servable(uids, refused) for m in messages]
        assert [m.uid for m in served] == [1, 2, 4, 5] and all(m.raw for m in served)
        assert refused == {}
        assert await client.uids_since(0) == [1, 2, 4, 5]     # the session is in step
    finally:
        await client.logout()
