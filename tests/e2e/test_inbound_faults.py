"""Mail in when the mail server misbehaves or the mailbox changes under us: a message the server
will not hand over, a tracked folder deleted, a message moved between tracked folders, and what a
queue that deletes after processing may delete.

Dovecot serves every message it has, so the refusals real servers make (Gmail: "NO Some messages
could not be FETCHed (Failure)" for one message, every time; or a FETCH answered OK without the
message's content) come from a relay in front of it that refuses the messages carrying a marker
header.  Both services run for real, in burst mode."""
from __future__ import annotations

import asyncio
import contextlib
import imaplib
import poplib
import re
from collections.abc import AsyncIterator, Callable

import pytest
import trustme

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
    messages whose bytes hold ``MARKER``.  IMAP, by ``imap_answer``: "NO" drops their FETCH
    responses and ends the UID FETCH with NO (after serving the others, as Gmail does); "BODY[] NIL"
    and "no BODY[]" leave the command's OK and rewrite their FETCH responses to carry ``BODY[] NIL``
    or no body item at all; "absent" drops their FETCH responses and leaves the OK (a message the
    server still has: it must not be passed over).  POP3 answers -ERR to their RETR.
    ``refusals`` counts the messages not handed over, ``nil_bodies`` the ``BODY[] NIL`` Dovecot itself
    sent.  ``before_fetch``, when set, runs (in a thread) once, before the first UID FETCH reaches
    Dovecot."""

    def __init__(self, host: str, port: int, protocol: str, imap_answer: str = "NO") -> None:
        self._upstream = (host, port)
        self._relay = self._imap if protocol == "imap" else self._pop3
        self.imap_answer = imap_answer
        self.refusals = 0
        self.nil_bodies = 0
        self.uidl_suffix = b""   # appended to every unique id of a UIDL listing
        self.hidden_capability = b""   # taken out of the IMAP server's capability lists
        self.sent = bytearray()   # what IMAP clients sent
        self.refuse_expunge = False   # answer NO to EXPUNGE and UID EXPUNGE
        self._expunge_tags: set[bytes] = set()
        self.before_fetch: Callable[[], None] | None = None
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
                if self.before_fetch is not None and b" UID FETCH " in data:
                    run, self.before_fetch = self.before_fetch, None
                    await asyncio.to_thread(run)
                self.sent += data
                if self.refuse_expunge:
                    self._expunge_tags.update(line.split(b" ", 1)[0] for line in data.split(b"\r\n")
                                              if b" EXPUNGE" in line.upper())
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        forward = asyncio.ensure_future(commands())
        try:
            refused = False
            while response := await _imap_response(up_reader):
                if response.startswith(b"* ") and b" FETCH " in response[:40] and MARKER in response:
                    self.refusals += 1
                    if self.imap_answer == "NO":
                        refused = True
                        continue
                    if self.imap_answer == "absent":
                        continue
                    # Dovecot sends BODY[] last: "... BODY[] {n}\r\n<the message>)\r\n".
                    head = response[:response.index(b" BODY[] {")]
                    response = head + (b" BODY[] NIL)\r\n" if self.imap_answer == "BODY[] NIL" else b")\r\n")
                elif response.startswith(b"* ") and b" FETCH " in response[:40] and b" BODY[] NIL)" in response:
                    self.nil_bodies += 1   # Dovecot's own: a message expunged under the session
                elif not response.startswith((b"*", b"+")) and response.split(b" ", 1)[0] in self._expunge_tags:
                    response = response.split(b" ", 1)[0] + b" NO [NOPERM] Expunge not allowed\r\n"
                elif self.hidden_capability and (b"[CAPABILITY " in response or response.startswith(b"* CAPABILITY ")):
                    response = re.sub(rb" " + re.escape(self.hidden_capability) + rb"(?=[ \]\r])", b"", response)
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
async def relayed(registry, org, dovecot, protocol: str, imap_answer: str = "NO",
                  **profile) -> AsyncIterator[tuple[RefusingRelay, ReadyMailbox]]:
    """A mailbox whose profile (with ``profile``'s settings) reaches Dovecot through a
    ``RefusingRelay``; made inactive at the end, so that later tests' ingest runs do not knock at
    the closed relay."""
    port = dovecot.imap_port if protocol == "imap" else dovecot.pop3_port
    async with RefusingRelay(dovecot.host, port, protocol, imap_answer) as relay:
        await registry.add_profile(org, imap_profile(dovecot, f"refusing-{protocol}", server_type=protocol,
                                                     incoming_host="127.0.0.1", incoming_port=relay.port, **profile))
        box = await ready_mailbox(registry, org, dovecot, tracking="all")
        try:
            yield relay, box
        finally:
            await registry.update_mailbox(org, box.email, active=False)


async def inbox_last_uid(registry, org, box) -> int:
    sync = (await registry.mailbox(org, box.email, sync=True)).sync
    return next(f.last_uid for f in sync.folders if f.folder == "INBOX")


async def ingested_uids(pool, box) -> list[int]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT uid FROM ingested_message WHERE mailbox_id = $1 ORDER BY uid", box.id)
    return [r["uid"] for r in rows]


# How the server does not hand the message over: the words its refusal shows up with in the warning.
IMAP_REFUSALS = {
    "NO": "Some messages could not be FETCHed (Failure)",
    # A UID FETCH answered OK whose response carries no content: before, an empty message was stored
    # and published (NIL), or the state moved past a message never ingested (no body item).
    "BODY[] NIL": "without the message's content (BODY[] NIL)",
    "no BODY[]": "without the message's content (no BODY[] in its FETCH response)",
    # Its FETCH response dropped from an OK answer, though the server still has it: before, the state
    # moved past it in silence, and it was never ingested.
    "absent": "left the message out of its answer to UID FETCH, yet still has it",
}


async def test_a_ca_file_that_became_unusable_is_the_mailboxs_tls_alert(settings, registry, org, dovecot, tmp_path) -> None:
    """The profile's CA file, fine when registered, is later replaced by something that holds no
    certificate: each session fails as a TLS failure of the mailbox (alert, back-off), not as a fault."""
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    await registry.add_profile(org, imap_profile(dovecot, "private-ca", tls_ca_file=str(ca_file)))
    box = await ready_mailbox(registry, org, dovecot, profile="private-ca")
    ca_file.write_text("not a certificate\n")
    await run_service(IngestService(settings), burst=True)
    mailbox = await registry.mailbox(org, box.email)
    assert mailbox.incoming.error_count == 1 and mailbox.incoming.backoff_until is not None
    assert [(a.code, "holds no PEM certificate" in a.message) for a in mailbox.alerts][-1:] == [("tls_failed", True)]
    await registry.update_mailbox(org, box.email, active=False)


@pytest.mark.parametrize("capability", [b"", b"MOVE"], ids=["move", "copy-without-move"])
async def test_a_message_given_up_on_is_moved_to_the_undeliverable_folder(settings, registry, org, dovecot, pool,
                                                                          capability: bytes) -> None:
    """The profile moves failed email to an Undeliverable folder: the message the server would not hand
    over is moved there once skipped (the folder created; with UID COPY where MOVE is not offered), and
    the rest of the Inbox, tracked, stays."""
    async with relayed(registry, org, dovecot, "imap", move_failed_to_undeliverable=True) as (relay, box):
        relay.hidden_capability = capability
        dovecot.deliver_many(box.email, [message("before"), REFUSED, message("after")])
        for _ in range(4):   # refused in three syncs: skipped; moved at the next session's start
            assert dovecot.message_count(box.email, "Undeliverable") == 0
            await pipeline(settings)
        assert (dovecot.message_count(box.email), dovecot.message_count(box.email, "Undeliverable")) == (2, 1)
        assert set(await activities(pool, org)) == {"before", "after"}
        assert (b" UID MOVE " in relay.sent, b" UID COPY " in relay.sent) == (not capability, bool(capability))
        with _imap(dovecot, box) as imap:
            imap.select("Undeliverable", readonly=True)
            assert imap.uid("SEARCH", "HEADER", "X-Test-Refuse", "yes")[1][0]
            imap.logout()
        refusals = relay.refusals
        await pipeline(settings)   # moved once: nothing more to do, and nothing to warn of
        assert relay.refusals == refusals
        assert (dovecot.message_count(box.email), dovecot.message_count(box.email, "Undeliverable")) == (2, 1)
        assert all(code != "undeliverable_not_moved" for code, _ in await alerts(registry, org, box))


async def test_a_copy_to_the_undeliverable_folder_is_made_once_even_when_the_original_cannot_be_removed(
        settings, registry, org, dovecot, pool) -> None:
    """Without MOVE, and with EXPUNGE answered NO: the message is copied once, a warning says it stays
    where it was, and later sessions do not copy it again.  (The relay rewrites only Dovecot's answer:
    Dovecot did expunge it, which is why the Inbox holds one message.)"""
    async with relayed(registry, org, dovecot, "imap", move_failed_to_undeliverable=True) as (relay, box):
        relay.hidden_capability, relay.refuse_expunge = b"MOVE", True
        dovecot.deliver_many(box.email, [message("before"), REFUSED])
        for _ in range(6):
            await pipeline(settings)
        assert (dovecot.message_count(box.email), dovecot.message_count(box.email, "Undeliverable")) == (1, 1)
        [warning] = [text for code, text in await alerts(registry, org, box) if code == "undeliverable_not_moved"]
        assert "were copied to 'Undeliverable' but stay in 'INBOX'" in warning and "Expunge not allowed" in warning


@pytest.mark.parametrize("answer", list(IMAP_REFUSALS), ids=["no", "body-nil", "no-body", "absent"])
async def test_imap_message_the_server_refuses_to_fetch_is_retried_then_skipped(settings, registry, org, dovecot, pool,
                                                                                 answer: str) -> None:
    async with relayed(registry, org, dovecot, "imap", answer) as (relay, box):
        dovecot.deliver_many(box.email, [message("before"), REFUSED, message("after 1"), message("after 2")])
        uid = refused_uid(dovecot, box)
        named = f"UID {uid} of the folder 'INBOX'"

        await pipeline(settings)
        # What the server served, before and after the refused message, is ingested, and nothing
        # stands in for the refused one ...
        assert set(await activities(pool, org)) == {"before", "after 1", "after 2"}
        assert await ingested_uids(pool, box) == [u for u in (1, 2, 3, 4) if u != uid]
        # ... but the saved state stays below the refused message, which is named in a warning.
        assert await inbox_last_uid(registry, org, box) == uid - 1
        first = await alerts(registry, org, box)
        assert [code for code, _ in first] == ["messages_refused"] and named in first[0][1]
        assert IMAP_REFUSALS[answer] in first[0][1]

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
        assert uid not in await ingested_uids(pool, box)


async def test_imap_message_expunged_between_search_and_fetch_is_neither_ingested_nor_refused(
        settings, registry, org, dovecot, pool) -> None:
    """Dovecot itself answers ``BODY[] NIL`` for a message expunged after our SEARCH, then reports it
    expunged (VANISHED, QRESYNC being on) before ``OK [EXPUNGEISSUED]``: the message is gone.  It
    must not become an empty message (it did), nor a refusal."""
    async with relayed(registry, org, dovecot, "imap") as (relay, box):
        dovecot.deliver_many(box.email, [message("before"), REFUSED, message("after 1"), message("after 2")])
        uid = refused_uid(dovecot, box)

        def expunge_it() -> None:   # by another client, after ingest's SEARCH and before its FETCH
            with _imap(dovecot, box) as imap:
                imap.select("INBOX")
                imap.uid("STORE", str(uid), "+FLAGS.SILENT", r"(\Deleted)")
                imap.expunge()
                imap.logout()

        relay.before_fetch = expunge_it
        await pipeline(settings)
        assert relay.before_fetch is None and relay.refusals == 0 and relay.nil_bodies == 1, \
            "Dovecot itself answered BODY[] NIL for the expunged message"
        assert set(await activities(pool, org)) == {"before", "after 1", "after 2"}
        assert await ingested_uids(pool, box) == [u for u in (1, 2, 3, 4) if u != uid]
        assert await alerts(registry, org, box) == []
        assert await inbox_last_uid(registry, org, box) == 4


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


@pytest.mark.parametrize("moved", [True, False], ids=["moved", "copied"])
async def test_queue_deletes_a_message_filed_into_another_tracked_folder(settings, registry, org, dovecot, pool,
                                                                        moved: bool) -> None:
    """Moved into another tracked folder, the message is removed from there; copied there (a user's
    copy, a server rule), from both folders: a copy found elsewhere is not taken for a move."""
    await registry.add_profile(org, imap_profile(dovecot))
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", delete_after_processing=True,
                                tracked_folders=["INBOX", "Projects"])
    await dovecot.append(queue.email, queue.password, message("first in projects"), folder="Projects")
    dovecot.deliver(queue.email, message("filed"))
    await run_service(IngestService(settings), burst=True)   # ingested from the Inbox, not yet decided
    with _imap(dovecot, queue) as imap:   # someone files it into Projects (a move: copy, then expunge)
        imap.select("INBOX")
        assert imap.uid("COPY", "1:*", "Projects")[0] == "OK"
        if moved:
            imap.uid("STORE", "1:*", "+FLAGS.SILENT", r"(\Deleted)")
            imap.expunge()
        imap.logout()
    await run_service(IngestService(settings), burst=True)   # finds it in Projects, not yet decided
    await run_service(EvaluateService(settings), burst=True)
    await run_service(IngestService(settings), burst=True)   # removes it
    assert set(await activities(pool, org)) == {"first in projects", "filed"}
    assert (dovecot.message_count(queue.email), dovecot.message_count(queue.email, "Projects")) == (0, 0)


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
