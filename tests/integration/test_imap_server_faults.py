"""The IMAP client and a folder's sync against servers that fail in ways real ones do: a SELECT
without UIDNEXT, an IDLE the server ends itself, a login refused for the server's own reasons, a
UID FETCH refused for every message (Dovecot's ``NO [SERVERBUG]`` on a storage failure) or with BAD,
a FETCH answer that leaves a message's UID (or the whole message) out, an ``[ALERT]``.  Scripted
servers (exact bytes, no real server misbehaves on cue); for the sync, PostgreSQL and the broker are
real, as in ``test_hostile_imap_sync``.  Nothing lost, nothing skipped for the server's fault, no
loop that runs hot, no wait for a reply already read."""
from __future__ import annotations

import asyncio
import logging
import time

import pytest

from services.ingest.imap_client import SERVER_WIDE_REFUSALS, FetchRefused, ImapClient, ImapCommandFailed
from services.ingest.imap_sync import ImapFolderSync
from shared.errors import AuthenticationFailed, ConduitError, ConnectionFailed
from tests.integration.test_hostile_imap_sync import msg, new_mailbox, published_uids, saved
from tests.support.loopback import loopback_server

SERVERBUG = b"NO [SERVERBUG] Internal error occurred. Refer to server log for more information. [2024-05-01 10:00:00]"


@pytest.fixture(autouse=True)
def quiet_kafka(caplog):
    caplog.set_level(logging.CRITICAL, logger="aiokafka")


def imap_handler(answer, *, log: list | None = None):
    """A server that logs in anyone and hands every other command to ``answer(tag, command, writer,
    reader)``, which returns the bytes to send (or None, having done it itself)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n")
        await writer.drain()
        try:
            while line := await reader.readline():
                line = line.rstrip(b"\r\n")
                if log is not None:
                    log.append(line)
                tag, _, command = line.partition(b" ")
                up = command.upper()
                if up.startswith(b"LOGOUT"):
                    writer.write(b"* BYE bye\r\n" + tag + b" OK\r\n")
                    await writer.drain()
                    break
                if up.startswith(b"LOGIN"):
                    out = tag + b" OK logged in\r\n"
                elif up.startswith(b"CAPABILITY"):
                    out = b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK\r\n"
                else:
                    out = await answer(tag, command, writer, reader)
                if out:
                    writer.write(out)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
    return handle


async def logged_in(port: int, timeout: float = 5) -> ImapClient:
    client = await ImapClient.connect("127.0.0.1", port, tls="none", timeout=timeout)
    await client.login("u", "p")
    return client


def uid_set(text: bytes, highest: int) -> set[int]:
    uids: set[int] = set()
    for part in text.split(b","):
        first, _, last = part.partition(b":")
        low, high = (highest if v == b"*" else int(v) for v in (first, last or first))
        uids.update(range(min(low, high), max(low, high) + 1))
    return uids


class FolderServer:
    """One folder (``mailbox``: UID -> raw).  ``fetch(tag, asked, default)`` may replace the answer
    to a UID FETCH; UID SEARCH UID takes any UID set.  ``commands`` logs what the client sent."""

    def __init__(self, mailbox: dict[int, bytes], fetch=None) -> None:
        self.mailbox = dict(mailbox)
        self.fetch = fetch
        self.commands: list[bytes] = []

    async def answer(self, tag, command, writer, reader):
        self.commands.append(command)
        up = command.upper()
        if up.startswith((b"EXAMINE", b"SELECT")):
            return (b"* %d EXISTS\r\n* OK [UIDVALIDITY 7] x\r\n* OK [UIDNEXT %d] x\r\n%s OK done\r\n"
                    % (len(self.mailbox), max(self.mailbox, default=0) + 1, tag))
        if up.startswith(b"UID SEARCH UID "):
            found = sorted(uid_set(command.split(b" ")[3], max(self.mailbox, default=0)) & set(self.mailbox))
            return b"* SEARCH" + b"".join(b" %d" % u for u in found) + b"\r\n" + tag + b" OK\r\n"
        if up.startswith(b"UID FETCH"):
            asked = uid_set(command.split(b" ")[2], max(self.mailbox, default=0))
            default = b""
            for seq, uid in enumerate(sorted(self.mailbox), start=1):
                if uid in asked:
                    raw = self.mailbox[uid]
                    default += b"* %d FETCH (UID %d FLAGS () BODY[] {%d}\r\n%s)\r\n" % (seq, uid, len(raw), raw)
            default += tag + b" OK done\r\n"
            return self.fetch(tag, asked, default) if self.fetch else default
        return tag + b" OK\r\n"

    @property
    def fetches(self) -> int:
        return sum(1 for c in self.commands if c.upper().startswith(b"UID FETCH"))


async def one_sync(port, pool, publisher, mailbox) -> ImapFolderSync:
    client = await logged_in(port)
    sync = ImapFolderSync(pool, publisher, mailbox)
    try:
        await sync.sync(client, ["INBOX"])
        return sync
    finally:
        await client.logout()


# -- IDLE --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uidnext", [b"", b"* OK [UIDNEXT 0] ok\r\n"], ids=["no-UIDNEXT", "UIDNEXT-0"])
async def test_idle_after_a_select_without_uidnext_waits(uidnext):
    """Without UIDNEXT (or with [UIDNEXT 0]) the client finds it with ``FETCH * (UID)``, whose own
    answer used to count as a change: the next IDLE returned at once without being sent, and the
    runner's loop (sync the Inbox, idle) ran hot for as long as nothing changed."""
    async def answer(tag, command, writer, reader):
        up = command.upper()
        if up.startswith(b"EXAMINE"):
            return b"* 3 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 7] ok\r\n" + uidnext + tag + b" OK [READ-ONLY] done\r\n"
        if up.startswith(b"FETCH * (UID)"):
            return b"* 3 FETCH (UID 3)\r\n" + tag + b" OK\r\n"
        if up == b"IDLE":
            writer.write(b"+ idling\r\n")
            await writer.drain()
            assert (await reader.readline()).rstrip() == b"DONE"
            return tag + b" OK idle done\r\n"
        return tag + b" OK\r\n"

    seen: list[bytes] = []
    async with loopback_server(imap_handler(answer, log=seen)) as port:
        client = await logged_in(port)
        for _ in range(2):
            assert (await client.select("INBOX")).uidnext == 4
            assert await client.idle(0.2) is False      # waited, and nothing changed
        await client.logout()
    assert sum(1 for line in seen if line.endswith(b" IDLE")) == 2


async def test_idle_ended_by_the_server_with_its_tagged_reply():
    """A server that ends IDLE itself with the tagged OK (its own time limit): the reply was taken
    for an untagged line and lost, the client sent DONE and waited for it until the command timeout
    broke the session.  Now the IDLE is over, without DONE, and the session usable."""
    async def answer(tag, command, writer, reader):
        if command.upper() == b"IDLE":
            return b"+ idling\r\n" + tag + b" OK IDLE terminated (timeout)\r\n"
        return tag + b" OK\r\n"

    seen: list[bytes] = []
    async with loopback_server(imap_handler(answer, log=seen)) as port:
        client = await logged_in(port, timeout=2)
        started = time.monotonic()
        assert await client.idle(5) is False
        assert time.monotonic() - started < 1.5
        assert await client.noop() is False              # in step: the next command's reply is its own
        await client.logout()
    assert b"DONE" not in seen


async def test_idle_ended_by_the_server_with_no_is_a_refusal_not_a_timeout():
    async def answer(tag, command, writer, reader):
        if command.upper() == b"IDLE":
            return b"+ idling\r\n" + tag + b" NO [LIMIT] Too many idling sessions\r\n"
        return tag + b" OK\r\n"

    async with loopback_server(imap_handler(answer)) as port:
        client = await logged_in(port, timeout=2)
        with pytest.raises(ImapCommandFailed, match="Too many idling sessions"):
            await client.idle(5)
        await client.close()


# -- login -------------------------------------------------------------------------------------------


async def _login_answered(code: bytes) -> ConduitError:
    async def handle(reader, writer):
        writer.write(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
        await writer.drain()
        line = await reader.readline()
        writer.write(line.split(b" ")[0] + b" NO " + code + b"\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    async with loopback_server(handle) as port:
        client = await ImapClient.connect("127.0.0.1", port, tls="none", timeout=3)
        try:
            with pytest.raises(ConduitError) as caught:
                await client.login("u", "p")
        finally:
            await client.close()
    return caught.value


@pytest.mark.parametrize("code", [b"[SERVERBUG] Internal error occurred", b"[INUSE] Mailbox in use",
                                  b"[LIMIT] Too many connections", b"[UNAVAILABLE] Try later"])
async def test_a_login_refused_for_the_servers_own_reason_is_no_wrong_password(code):
    """RFC 5530: these codes say nothing of the credentials.  They were a "rejected the credentials"
    alert (and for XOAUTH2 the token forgotten); now a connection failure, retried with back-off."""
    error = await _login_answered(code)
    assert isinstance(error, ConnectionFailed) and not isinstance(error, AuthenticationFailed), error.message


@pytest.mark.parametrize("code", [b"Login failed", b"[AUTHENTICATIONFAILED] Authentication failed.",
                                  b"[AUTHORIZATIONFAILED] Not allowed", b"[EXPIRED] Password expired"])
async def test_a_login_refused_for_the_credentials_stays_an_authentication_failure(code):
    assert isinstance(await _login_answered(code), AuthenticationFailed)


# -- alerts ------------------------------------------------------------------------------------------


async def test_an_alert_is_logged_once_a_session(caplog):
    """RFC 3501 7.1: the text of an [ALERT] must be presented; a server may repeat it with every command."""
    async def answer(tag, command, writer, reader):
        return b"* OK [ALERT] Your mailbox is almost full\r\n" + tag + b" OK\r\n"

    caplog.set_level(logging.WARNING, logger="services.ingest.imap_client")
    async with loopback_server(imap_handler(answer)) as port:
        client = await logged_in(port)
        await client.noop()
        await client.noop()
        await client.logout()
    alerts = [r for r in caplog.records if "Your mailbox is almost full" in r.getMessage()]
    assert len(alerts) == 1 and alerts[0].levelno == logging.WARNING


# -- UID FETCH refused -------------------------------------------------------------------------------


async def test_a_fetch_refused_with_bad_is_not_narrowed_down_to_single_messages():
    """BAD is the command's (or the session's) fault, not the messages': one command, then FetchRefused."""
    server = FolderServer({u: msg(u) for u in range(1, 11)},
                          fetch=lambda tag, asked, default: tag + b" BAD Error in IMAP command UID FETCH\r\n")
    async with loopback_server(imap_handler(server.answer)) as port:
        client = await logged_in(port)
        await client.select("INBOX")
        refused: dict[int, str] = {}
        with pytest.raises(FetchRefused) as caught:
            async for _ in client.fetch_servable(range(1, 11), refused):
                pass
        await client.logout()
    assert caught.value.status == "BAD" and refused == {} and server.fetches == 1


async def test_a_server_refusing_every_message_is_not_asked_for_each_one():
    """A server that refuses every UID FETCH (a storage failure): narrowing down to single UIDs
    would cost two commands a message; after ``SERVER_WIDE_REFUSALS`` refused alone, none served,
    the fetch ends as the server's failure."""
    server = FolderServer({u: msg(u) for u in range(1, 201)},
                          fetch=lambda tag, asked, default: tag + b" " + SERVERBUG + b"\r\n")
    async with loopback_server(imap_handler(server.answer)) as port:
        client = await logged_in(port)
        await client.select("INBOX")
        with pytest.raises(ImapCommandFailed, match="served none") as caught:
            async for _ in client.fetch_servable(range(1, 201), {}):
                pass
        await client.logout()
    assert not isinstance(caught.value, FetchRefused)
    assert server.fetches < 4 * SERVER_WIDE_REFUSALS + 20, server.fetches


async def test_a_server_wide_temporary_fetch_failure_skips_nothing(settings, registry, org, pool, publisher) -> None:
    """Dovecot answers a storage failure with NO [SERVERBUG]: no fault of the messages.  Refused for
    three syncs, every new message used to be skipped for ever (and moved to Undeliverable where the
    profile says so), although the server served them all at the fourth."""
    mailbox = await new_mailbox(registry, org)
    broken = {"on": True}
    server = FolderServer({u: msg(u) for u in (1, 2, 3, 4)},
                          fetch=lambda tag, asked, default: tag + b" " + SERVERBUG + b"\r\n" if broken["on"] else default)
    async with loopback_server(imap_handler(server.answer)) as port:
        for _ in range(3):
            sync = await one_sync(port, pool, publisher, mailbox)
            assert [code for code, _ in sync.warnings] == ["folder_sync_failed"], sync.warnings
            assert "Internal error occurred" in sync.warnings[0][1]
        assert await saved(pool, mailbox) is None
        broken["on"] = False
        sync = await one_sync(port, pool, publisher, mailbox)
    assert sync.warnings == []
    assert await published_uids(settings, 4) == [1, 2, 3, 4]
    assert (await saved(pool, mailbox)).last_uid == 4


async def test_a_message_the_server_cannot_serve_among_others_is_still_refused(
        settings, registry, org, pool, publisher) -> None:
    """The other side (Gmail's "Some messages could not be FETCHed", for one message): what was
    served is ingested, the one refused is counted and the state stays below it."""
    mailbox = await new_mailbox(registry, org)

    def fetch(tag, asked, default):
        if 2 not in asked:
            return default
        return _without_uid(default, tag, 2) + tag + b" NO Some messages could not be FETCHed (Failure)\r\n"

    server = FolderServer({u: msg(u) for u in (1, 2, 3)}, fetch=fetch)
    async with loopback_server(imap_handler(server.answer)) as port:
        sync = await one_sync(port, pool, publisher, mailbox)
    assert [code for code, _ in sync.warnings] == ["messages_refused"] and "UID 2 " in sync.warnings[0][1]
    assert (await saved(pool, mailbox)).last_uid == 1
    assert await published_uids(settings, 2) == [1, 3]


def _without_uid(default: bytes, tag: bytes, uid: int) -> bytes:
    """The FETCH responses of ``default`` (an answer ending with ``tag``'s OK), less ``uid``'s."""
    responses = default[:default.rindex(tag + b" OK")]
    out, pos = b"", 0
    while pos < len(responses):
        head_end = responses.index(b"}\r\n", pos) + 3
        size = int(responses[responses.rindex(b"{", pos, head_end) + 1:head_end - 3])
        end = head_end + size + 3
        if b"(UID %d " % uid not in responses[pos:head_end]:
            out += responses[pos:end]
        pos = end
    return out


# -- UIDs an OK answer does not name -----------------------------------------------------------------


async def test_a_fetch_response_without_uid_does_not_move_the_state_past_that_message(
        settings, registry, org, pool, publisher) -> None:
    """RFC 3501 6.4.8: a UID FETCH answer carries UID.  A server that leaves it out of one response:
    that message used to be dropped as if gone, and the state passed it with no warning, so it was
    never ingested.  Now the server is asked whether it still has it: it does, so it is refused
    (the state stays below it) and asked for again."""
    mailbox = await new_mailbox(registry, org)
    sloppy = {"on": True}

    def fetch(tag, asked, default):
        return default.replace(b"(UID 2 FLAGS", b"(FLAGS") if sloppy["on"] else default

    server = FolderServer({u: msg(u) for u in (1, 2, 3)}, fetch=fetch)
    async with loopback_server(imap_handler(server.answer)) as port:
        sync = await one_sync(port, pool, publisher, mailbox)
        assert (await saved(pool, mailbox)).last_uid == 1
        assert [code for code, _ in sync.warnings] == ["messages_refused"] and "UID 2 " in sync.warnings[0][1]
        sloppy["on"] = False
        sync = await one_sync(port, pool, publisher, mailbox)
    assert sync.warnings == []
    assert await published_uids(settings, 3) == [1, 2, 3]
    assert (await saved(pool, mailbox)).last_uid == 3


@pytest.mark.parametrize("still_there", [True, False], ids=["left-out", "gone"])
async def test_a_uid_an_ok_answer_leaves_out_is_passed_only_when_the_server_no_longer_has_it(
        settings, registry, org, pool, publisher, still_there: bool) -> None:
    """A UID FETCH answered OK without a word of a UID it asked for: expunged under us (the state
    moves past it, no warning), or left out by a broken server that still has it (refused)."""
    mailbox = await new_mailbox(registry, org)
    server = FolderServer({u: msg(u) for u in (1, 2, 3)})

    def fetch(tag, asked, default):
        if not still_there:
            server.mailbox.pop(2, None)   # expunged by another client after our SEARCH
        return _without_uid(default, tag, 2) + tag + b" OK done\r\n"

    server.fetch = fetch
    async with loopback_server(imap_handler(server.answer)) as port:
        sync = await one_sync(port, pool, publisher, mailbox)
    assert any(c.upper() == b"UID SEARCH UID 2" for c in server.commands), server.commands
    if still_there:
        assert [code for code, _ in sync.warnings] == ["messages_refused"], sync.warnings
        assert (await saved(pool, mailbox)).last_uid == 1
    else:
        assert sync.warnings == []
        assert (await saved(pool, mailbox)).last_uid == 3
    assert await published_uids(settings, 2) == [1, 3]
