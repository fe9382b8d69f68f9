"""Mail in when the mail server misbehaves or the mailbox changes under us: a message the server
will not hand over, a tracked folder deleted, a message moved between tracked folders, and what a
queue that deletes after processing may delete.

Dovecot serves every message it has, so the refusals real servers make (Gmail: "NO Some messages
could not be FETCHed (Failure)" for one message, every time) come from a relay in front of it that
refuses the messages carrying a marker header.  Both services run for real, in burst mode."""
from __future__ import annotations

import asyncio
import contextlib
import imaplib
import poplib
import re
from collections.abc import AsyncIterator

import pytest

from services.evaluate.service import EvaluateService
from services.ingest.service import IngestService
from shared.lifecycle import run_service
from tests.e2e.test_inbound import activities, pipeline
from tests.support.mailboxes import ReadyMailbox, imap_profile, message, pop3_profile, ready_mailbox

pytestmark = pytest.mark.peers

MARKER = b"X-Test-Refuse: yes"
REFUSED = message("refused", extra=MARKER.decode() + "\r\n")
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")


class RefusingRelay:
    """A TCP relay on loopback in front of Dovecot's IMAP or POP3 port that will not hand over the
    messages whose bytes hold ``MARKER``: IMAP drops their FETCH responses and ends the UID FETCH
    with NO (after serving the others, as Gmail does); POP3 answers -ERR to their RETR.
    ``refusals`` counts the refused messages."""

    def __init__(self, host: str, port: int, protocol: str) -> None:
        self._upstream = (host, port)
        self._relay = self._imap if protocol == "imap" else self._pop3
        self.refusals = 0
        self.uidl_suffix = b""   # appended to every unique id of a UIDL listing
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RefusingRelay:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        try:
            await self._relay(reader, writer, up_reader, up_writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            up_writer.close()

    async def _imap(self, reader, writer, up_reader, up_writer) -> None:
        async def commands() -> None:   # the client's bytes pass unchanged (IDLE's DONE included)
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        forward = asyncio.ensure_future(commands())
        try:
            refused = False
            while response := await _imap_response(up_reader):
                if response.startswith(b"* ") and b" FETCH " in response[:40] and MARKER in response:
                    refused = True
                    self.refusals += 1
                    continue
                # Pipelined commands complete in order: the next tagged answer is that FETCH's own.
                if refused and not response.startswith((b"*", b"+")):
                    tag, status, _ = response.split(b" ", 2)
                    if status == b"OK":
                        response = tag + b" NO Some messages could not be FETCHed (Failure)\r\n"
                    refused = False
                writer.write(response)
                await writer.drain()
        finally:
            forward.cancel()

    async def _pop3(self, reader, writer, up_reader, up_writer) -> None:
        # One command at a time (pipelined commands simply wait in ``reader``).
        writer.write(await up_reader.readline())
        while line := await reader.readline():
            up_writer.write(line)
            await up_writer.drain()
            words = line.split()
            verb = words[0].upper() if words else b""
            status = await up_reader.readline()
            body = b""
            if status.startswith(b"+OK") and (verb in (b"CAPA", b"RETR", b"TOP") or
                                             (verb in (b"UIDL", b"LIST") and len(words) == 1)):
                while (body_line := await up_reader.readline()) != b".\r\n":
                    body += body_line
                body += b".\r\n"
            if verb == b"UIDL" and self.uidl_suffix:
                body = b"".join(line if line == b".\r\n" else line.rstrip(b"\r\n") + self.uidl_suffix + b"\r\n"
                                for line in body.splitlines(keepends=True))
            if verb == b"RETR" and MARKER in body:
                self.refusals += 1
                status, body = b"-ERR Message could not be read\r\n", b""
            writer.write(status + body)
            await writer.drain()
            if verb == b"QUIT":
                return


async def _imap_response(reader: asyncio.StreamReader) -> bytes:
    """One whole IMAP response, literals included (b"" at the end of the stream)."""
    response = await reader.readline()
    while (literal := _LITERAL.search(response)) is not None:
        response += await reader.readexactly(int(literal.group(1)))
        response += await reader.readline()
    return response


def _imap(dovecot, box) -> imaplib.IMAP4:
    imap = imaplib.IMAP4(dovecot.host, dovecot.imap_port)
    imap.login(box.email, box.password)
    return imap


def refused_uid(dovecot, box) -> int:
    with _imap(dovecot, box) as imap:
        imap.select("INBOX", readonly=True)
        _, data = imap.uid("SEARCH", "HEADER", "X-Test-Refuse", "yes")
        imap.logout()
    return int(data[0])


def refused_uidl(dovecot, box) -> str:
    pop = poplib.POP3(dovecot.host, dovecot.pop3_port)
    try:
        pop.user(box.email)
        pop.pass_(box.password)
        for entry in pop.uidl()[1]:
            number, uidl = entry.decode().split()
            if MARKER in b"\r\n".join(pop.top(int(number), 0)[1]):
                return uidl
    finally:
        pop.quit()
    raise AssertionError("the refused message is not in the maildrop")


async def alerts(registry, org, box) -> list[tuple[str, str]]:
    mailbox = await registry.mailbox(org, box.email)
    assert mailbox.incoming.error_count == 0, "the mailbox must not back off"
    return [(a.code, a.message) for a in mailbox.alerts if a.severity != "information"]


@contextlib.asynccontextmanager
async def relayed(registry, org, dovecot, protocol: str) -> AsyncIterator[tuple[RefusingRelay, ReadyMailbox]]:
    """A mailbox whose profile reaches Dovecot through a ``RefusingRelay``; made inactive at the end,
    so that later tests' ingest runs do not knock at the closed relay."""
    port = dovecot.imap_port if protocol == "imap" else dovecot.pop3_port
    async with RefusingRelay(dovecot.host, port, protocol) as relay:
        await registry.add_profile(org, imap_profile(dovecot, f"refusing-{protocol}", server_type=protocol,
                                                     incoming_host="127.0.0.1", incoming_port=relay.port))
        box = await ready_mailbox(registry, org, dovecot, tracking="all")
        try:
            yield relay, box
        finally:
            await registry.update_mailbox(org, box.email, active=False)


async def inbox_last_uid(registry, org, box) -> int:
    sync = (await registry.mailbox(org, box.email, sync=True)).sync
    return next(f.last_uid for f in sync.folders if f.folder == "INBOX")


async def test_imap_message_the_server_refuses_to_fetch_is_retried_then_skipped(settings, registry, org, dovecot, pool) -> None:
    async with relayed(registry, org, dovecot, "imap") as (relay, box):
        dovecot.deliver_many(box.email, [message("before"), REFUSED, message("after 1"), message("after 2")])
        uid = refused_uid(dovecot, box)
        named = f"UID {uid} of the folder 'INBOX'"

        await pipeline(settings)
        # What the server served, before and after the refused message, is ingested ...
        assert set(await activities(pool, org)) == {"before", "after 1", "after 2"}
        # ... but the saved state stays below the refused message, which is named in a warning.
        assert await inbox_last_uid(registry, org, box) == uid - 1
        first = await alerts(registry, org, box)
        assert [code for code, _ in first] == ["messages_refused"] and named in first[0][1]

        await pipeline(settings)
        await pipeline(settings)   # refused in three syncs: skipped, and named again
        codes = [code for code, text in await alerts(registry, org, box) if named in text]
        assert sorted(codes) == ["messages_refused", "messages_skipped"]
        assert await inbox_last_uid(registry, org, box) == 4   # past it now
        refusals = relay.refusals

        dovecot.deliver(box.email, message("much later"))
        await pipeline(settings)
        assert set(await activities(pool, org)) == {"before", "after 1", "after 2", "much later"}
        assert relay.refusals == refusals, "a skipped message is not asked for again"
        assert await inbox_last_uid(registry, org, box) == 5
        assert all(code != "folder_missing" for code, _ in await alerts(registry, org, box))


async def test_pop3_message_the_server_refuses_to_retrieve_is_retried_then_skipped(settings, registry, org, dovecot, pool) -> None:
    async with relayed(registry, org, dovecot, "pop3") as (relay, box):
        dovecot.deliver_many(box.email, [message("before"), REFUSED, message("after 1"), message("after 2")])
        named = f"UIDL {refused_uidl(dovecot, box)}"

        await pipeline(settings)
        assert set(await activities(pool, org)) == {"before", "after 1", "after 2"}
        first = await alerts(registry, org, box)
        assert [code for code, _ in first] == ["messages_refused"] and named in first[0][1]

        await pipeline(settings)
        await pipeline(settings)
        codes = [code for code, text in await alerts(registry, org, box) if named in text]
        assert sorted(codes) == ["messages_refused", "messages_skipped"]
        refusals = relay.refusals

        dovecot.deliver(box.email, message("much later"))
        await pipeline(settings)
        assert set(await activities(pool, org)) == {"before", "after 1", "after 2", "much later"}
        assert relay.refusals == refusals, "a skipped message is not asked for again"


async def test_queue_whose_tracked_folder_was_deleted_still_syncs_its_inbox(settings, registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", delete_after_processing=True,
                                tracked_folders=["INBOX", "Projects"])
    await dovecot.append(queue.email, queue.password, message("in projects"), folder="Projects")
    await pipeline(settings)   # an activity now, so the next session would delete it from Projects ...
    assert set(await activities(pool, org)) == {"in projects"}
    with _imap(dovecot, queue) as imap:   # ... but an administrator deletes the folder first
        assert imap.delete("Projects")[0] == "OK"
        imap.logout()
    dovecot.deliver(queue.email, message("new in inbox"))
    await pipeline(settings)
    assert set(await activities(pool, org)) == {"in projects", "new in inbox"}
    await run_service(IngestService(settings), burst=True)
    assert dovecot.message_count(queue.email) == 0, "the Inbox's processed mail is still removed"
    assert [code for code, _ in await alerts(registry, org, queue)] == ["folder_missing"]


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_queue_deletes_only_mail_that_became_an_activity(settings, registry, org, dovecot, pool, protocol: str) -> None:
    profile = imap_profile(dovecot) if protocol == "imap" else pop3_profile(dovecot)
    await registry.add_profile(org, profile)
    await registry.add_record(org, "contact", "Kim", "kim@customer.example")
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", tracking="known_records",
                                delete_after_processing=True)
    dovecot.deliver(queue.email, message("kim to support", sender="kim@customer.example"))
    dovecot.deliver(queue.email, message("stranger to support", sender="who@else.example"))
    await pipeline(settings)   # both decided; only Kim's became an activity
    await run_service(IngestService(settings), burst=True)
    assert set(await activities(pool, org)) == {"kim to support"}
    assert dovecot.message_count(queue.email) == 1, "the untracked message stays on the server"
    with _imap(dovecot, queue) as imap:
        imap.select("INBOX", readonly=True)
        assert imap.search(None, "SUBJECT", '"stranger to support"')[1][0]
        imap.logout()


async def test_queue_deletes_a_message_moved_to_another_tracked_folder(settings, registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", delete_after_processing=True,
                                tracked_folders=["INBOX", "Projects"])
    await dovecot.append(queue.email, queue.password, message("first in projects"), folder="Projects")
    dovecot.deliver(queue.email, message("moving"))
    await run_service(IngestService(settings), burst=True)   # ingested from the Inbox, not yet decided
    with _imap(dovecot, queue) as imap:   # someone files it into Projects (a move: copy, then expunge)
        imap.select("INBOX")
        assert imap.uid("COPY", "1:*", "Projects")[0] == "OK"
        imap.uid("STORE", "1:*", "+FLAGS.SILENT", r"(\Deleted)")
        imap.expunge()
        imap.logout()
    await run_service(EvaluateService(settings), burst=True)
    await run_service(IngestService(settings), burst=True)   # finds it in Projects: its row moves there
    await run_service(IngestService(settings), burst=True)   # and removes it from there
    assert set(await activities(pool, org)) == {"first in projects", "moving"}
    assert dovecot.message_count(queue.email, "Projects") == 0


async def test_pop3_unique_ids_too_long_to_keep_are_a_clear_alert_not_a_crash_loop(settings, registry, org, dovecot, pool) -> None:
    """A UIDL listing whose ids break RFC 1939 (here 300 characters): a mailbox alert saying so, and the
    mailbox backs off; before, the runner died on the event's validation and started again at once."""
    async with relayed(registry, org, dovecot, "pop3") as (relay, box):
        relay.uidl_suffix = b"x" * 300
        dovecot.deliver(box.email, message("kept"))
        await run_service(IngestService(settings), burst=True)
        mailbox = await registry.mailbox(org, box.email)
        assert mailbox.incoming.error_count == 1 and mailbox.incoming.backoff_until is not None, mailbox.incoming
        assert [(a.severity, a.code, "UIDL" in a.message) for a in mailbox.alerts][-1:] == [("warning", "protocol_error", True)], mailbox.alerts
        assert dovecot.message_count(box.email) == 1
