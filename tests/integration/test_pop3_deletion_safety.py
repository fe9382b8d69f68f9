"""POP3 ingest and *delete email from the server after processing*, against the real Dovecot: a queue
deletes only the message that became an activity, and no message blocks the others.

Repeated and reused UIDLs come from a Dovecot that takes a message's X-UIDL header as its UIDL
(``pop3_reuse_xuidl``) and allows the same UIDL twice (``pop3_uidl_duplicates = allow``, its default)."""
from __future__ import annotations

import logging
import re
import uuid

import pytest

from conduit.peers.dovecot import Dovecot
from services.evaluate.service import EvaluateService
from services.ingest.pop3_client import Pop3Client
from services.ingest.pop3_sync import listing_ids
from services.ingest.service import IngestService
from services.ingest.wire import MAX_MESSAGE_BYTES, MailConnection
from shared.lifecycle import run_service
from tests.support.mailboxes import imap_profile, message, pop3_profile, ready_mailbox
from tests.support.relay import CLOSE, line_relay

pytestmark = pytest.mark.peers


class XuidlDovecot(Dovecot):
    def _write_config(self) -> None:
        super()._write_config()
        with open(self.config_path, "a") as f:
            f.write("pop3_reuse_xuidl = yes\npop3_uidl_duplicates = allow\n")


@pytest.fixture(scope="module")
async def xdovecot(tmp_path_factory):
    server = XuidlDovecot(tmp_path_factory.mktemp("xuidl") / "dovecot")
    await server.start()
    yield server
    await server.stop()


async def ingest(settings) -> None:
    await run_service(IngestService(settings), burst=True)


async def pipeline(settings) -> None:
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)


async def subjects_on_server(server, box) -> list[str]:
    client = await Pop3Client.connect(server.host, server.pop3_port, tls="none")
    await client.login(box.email, box.password)
    found = []
    for number in sorted(await client.uidl()):
        raw = await client.retr(number)
        found.append(re.search(rb"^Subject: (.*)$", raw, re.M)[1].decode().strip())
    await client.quit()
    return found


async def activity_subjects(pool, org) -> list[str]:
    async with pool.acquire() as conn:
        return sorted(r["subject"] for r in await conn.fetch(
            "SELECT subject FROM email_activity WHERE organization_id = $1", org.id))


async def without_backoff(pool, box) -> None:
    async with pool.acquire() as conn:
        await conn.execute("UPDATE mailbox SET incoming_backoff_until = NULL WHERE id = $1", box.id)


# ---- 1. a UIDL listed more than once -------------------------------------------------------------


async def test_a_message_with_a_processed_messages_uidl_is_ingested_and_neither_is_deleted(
        settings, registry, org, pool, xdovecot, caplog):
    await registry.add_profile(org, pop3_profile(xdovecot, "xuidl-1"))
    queue = await ready_mailbox(registry, org, xdovecot, owner="queue", profile="xuidl-1", delete_after_processing=True)
    xdovecot.deliver(queue.email, message("A processed", extra="X-UIDL: same-uidl\r\n"))
    await pipeline(settings)
    xdovecot.deliver(queue.email, message("B with the same UIDL", extra="X-UIDL: same-uidl\r\n"))
    await pipeline(settings)      # before: B skipped as seen, then DELE'd by A's UIDL
    await ingest(settings)
    assert await subjects_on_server(xdovecot, queue) == ["A processed", "B with the same UIDL"]
    assert await activity_subjects(pool, org) == ["A processed", "B with the same UIDL"]
    repeats = [r for r in caplog.records if "more than one message" in r.getMessage() and str(queue.id) in r.getMessage()]
    assert len(repeats) == 1 and repeats[0].levelno == logging.WARNING   # once per mailbox and process

    # A leaves (another client): B, ingested under an id of its own, is not ingested again, and is
    # now the only message with that UIDL but not the one ingested under it: it stays.
    client = await Pop3Client.connect(xdovecot.host, xdovecot.pop3_port, tls="none")
    await client.login(queue.email, queue.password)
    await client.dele(1)
    await client.quit()
    await pipeline(settings)
    assert await subjects_on_server(xdovecot, queue) == ["B with the same UIDL"]
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM email_decision WHERE mailbox_id = $1", queue.id) == 2


async def test_two_processed_messages_sharing_a_uidl_stay_and_the_mailbox_keeps_working(
        settings, registry, org, pool, xdovecot):
    await registry.add_profile(org, pop3_profile(xdovecot, "xuidl-2"))
    queue = await ready_mailbox(registry, org, xdovecot, owner="queue", profile="xuidl-2", delete_after_processing=True)
    xdovecot.deliver_many(queue.email, [message("C1", extra="X-UIDL: dup2\r\n"), message("C2", extra="X-UIDL: dup2\r\n")])
    await pipeline(settings)
    assert await activity_subjects(pool, org) == ["C1", "C2"]
    other = message("D unique")
    xdovecot.deliver(queue.email, other)
    await pipeline(settings)
    await ingest(settings)        # before: DELE 1 and DELE 1 again, -ERR, no QUIT: nothing ever removed
    state = await registry.mailbox(org, queue.email)
    assert state.incoming.error_count == 0, [a.message for a in state.alerts]
    assert await subjects_on_server(xdovecot, queue) == ["C1", "C2"]   # D, its UIDL its own, is gone


# ---- 2. a Message-ID reused in another mailbox ---------------------------------------------------


def test_listing_ids_tell_the_messages_of_a_repeated_uidl_apart():
    ids, repeated = listing_ids({1: "a", 2: "u", 3: "u", 4: "u", 5: "b"}, {1: 10, 2: 20, 3: 30, 4: 30, 5: 40})
    assert repeated == {"u"}
    assert ids == {1: "a", 2: "u", 3: "u #30", 4: "u #30.2", 5: "b"}
    # The first one leaves and a new one (another size) comes: the new one has an id not seen before.
    assert listing_ids({1: "u", 2: "u", 3: "u"}, {1: 30, 2: 30, 3: 99})[0] == {1: "u", 2: "u #30", 3: "u #99"}
    assert listing_ids({1: "a", 2: "b"}, {}) == ({1: "a", 2: "b"}, set())


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
async def test_a_message_reusing_a_message_id_tracked_elsewhere_is_not_deleted(settings, registry, org, dovecot, pool,
                                                                              protocol):
    name = f"xm-{protocol}-{uuid.uuid4().hex[:6]}"
    profile = pop3_profile(dovecot, name) if protocol == "pop3" else imap_profile(dovecot, name)
    await registry.add_profile(org, profile)
    user = await ready_mailbox(registry, org, dovecot, profile=name)
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", profile=name, delete_after_processing=True)
    reused = f"<static-{uuid.uuid4().hex[:8]}@scanner.example>"
    shared_id = f"<both-{uuid.uuid4().hex[:8]}@customer.example>"
    dovecot.deliver(user.email, message("scan for the user", message_id=reused))
    # One delivery to both: the copies differ only in their trace fields.
    dovecot.deliver(user.email, b"Received: by mx1.example; Fri, 27 Nov 2026 09:00:01 +0000\r\n"
                    b"Delivered-To: user\r\n" + message("to both", message_id=shared_id))
    await pipeline(settings)
    dovecot.deliver(queue.email, message("another scan for the queue", message_id=reused, body="Other page.\r\n"))
    dovecot.deliver(queue.email, b"Received: by mx2.example; Fri, 27 Nov 2026 09:00:02 +0000\r\n"
                    b"Delivered-To: queue\r\nReturn-Path: <a@customer.example>\r\n" + message("to both", message_id=shared_id))
    await pipeline(settings)
    async with pool.acquire() as conn:
        reasons = {r["subject"]: r["reason"] for r in await conn.fetch(
            "SELECT subject, reason FROM email_decision WHERE mailbox_id = $1", queue.id)}
    assert reasons == {"another scan for the queue": "already_tracked", "to both": "already_tracked"}
    await ingest(settings)
    assert dovecot.message_count(queue.email) == 1    # the scan stays; the copy of "to both" is gone
    assert dovecot.message_count(user.email) == 2


# ---- 3. messages that left the maildrop ----------------------------------------------------------


async def test_a_uidl_reused_after_its_message_left_does_not_delete_the_new_message(
        settings, registry, org, pool, xdovecot):
    await registry.add_profile(org, pop3_profile(xdovecot, "xuidl-3"))
    queue = await ready_mailbox(registry, org, xdovecot, owner="queue", profile="xuidl-3", delete_after_processing=True)
    # A is processed while deletion is off for a moment, so it stays on the server.
    await registry.update_mailbox(org, queue.email, delete_after_processing=False)
    xdovecot.deliver(queue.email, message("A processed", extra="X-UIDL: r1\r\n"))
    await pipeline(settings)
    await registry.update_mailbox(org, queue.email, delete_after_processing=True)
    client = await Pop3Client.connect(xdovecot.host, xdovecot.pop3_port, tls="none")   # another client takes A
    await client.login(queue.email, queue.password)
    await client.dele(1)
    await client.quit()
    await ingest(settings)                    # an empty maildrop: A's row is marked removed
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT bool_and(removed_from_server) FROM ingested_message WHERE mailbox_id = $1",
                                   queue.id) is True
    xdovecot.deliver(queue.email, message("B new", extra="X-UIDL: r1\r\n"))
    await ingest(settings)                    # before: B ingested, then DELE'd at once by A's row
    assert await subjects_on_server(xdovecot, queue) == ["B new"]
    await run_service(EvaluateService(settings), burst=True)
    await ingest(settings)                    # B decided (an activity): now it goes
    assert await subjects_on_server(xdovecot, queue) == []
    assert await activity_subjects(pool, org) == ["A processed", "B new"]


class QuitAnswerLost:
    """A relay to Dovecot's POP3 that, while ``armed``, passes QUIT on and drops its answer: the
    server commits the deletions, the client never hears so."""

    def __init__(self) -> None:
        self.armed = False
        self.quitting = False

    async def start(self, host: str, port: int) -> None:
        self.server, self.port = await line_relay(host, port, self.on_line, self.on_session, self.on_answer)

    def on_session(self) -> None:
        self.quitting = False

    def on_line(self, line: bytes) -> None:
        self.quitting = self.quitting or (self.armed and line.upper().startswith(b"QUIT"))

    def on_answer(self, line: bytes) -> bytes:
        return CLOSE if self.quitting else line   # the answer to QUIT: dropped, and the connection closed


async def test_messages_deleted_at_a_quit_whose_answer_was_lost_are_marked_removed(settings, registry, org, dovecot, pool):
    proxy = QuitAnswerLost()
    await proxy.start(dovecot.host, dovecot.pop3_port)
    try:
        await registry.add_profile(org, imap_profile(dovecot, "quit-lost", server_type="pop3", incoming_port=proxy.port))
        queue = await ready_mailbox(registry, org, dovecot, owner="queue", profile="quit-lost",
                                    delete_after_processing=True)
        dovecot.deliver_many(queue.email, [message(f"q{i}") for i in range(3)])
        await pipeline(settings)
        proxy.armed = True
        await ingest(settings)               # DELE x3, QUIT: the server deletes, the +OK is lost
        proxy.armed = False
        assert dovecot.message_count(queue.email) == 0
        await without_backoff(pool, queue)
        await ingest(settings)               # before: the rows stayed "on the server" for ever
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT removed_from_server FROM ingested_message WHERE mailbox_id = $1", queue.id)
        assert [r["removed_from_server"] for r in rows] == [True] * 3
    finally:
        proxy.server.close()


# ---- 4. a message larger than Conduit reads ------------------------------------------------------


async def test_an_oversize_message_is_skipped_and_does_not_hold_up_the_others(settings, registry, org, dovecot, pool):
    await registry.add_profile(org, pop3_profile(dovecot, "huge-pop3"))
    box = await ready_mailbox(registry, org, dovecot, profile="huge-pop3")
    line = b"x" * 998 + b"\r\n"
    huge = message("huge", body="") + line * (MAX_MESSAGE_BYTES // len(line) + 1024)   # 201 MiB
    dovecot.deliver_many(box.email, [message("before"), huge, message("after")])
    for _ in range(3):
        await without_backoff(pool, box)
        await ingest(settings)
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM ingested_message WHERE mailbox_id = $1", box.id) == 2
    state = await registry.mailbox(org, box.email)
    assert state.incoming.error_count == 0
    assert {a.code for a in state.alerts} >= {"messages_refused", "messages_skipped"}
    assert any("200 MiB" in a.message for a in state.alerts if a.code == "messages_skipped")


class ListLiar:
    """A relay to Dovecot's POP3 that gives every message's LIST size as 100 octets."""

    def __init__(self) -> None:
        self.listing = False

    async def start(self, host: str, port: int) -> None:
        self.server, self.port = await line_relay(host, port, self.on_line, self.on_session, self.on_answer)

    def on_session(self) -> None:
        self.listing = False

    def on_line(self, line: bytes) -> None:
        self.listing = self.listing or line.upper().startswith(b"LIST")

    def on_answer(self, line: bytes) -> bytes:
        if self.listing and line == b".\r\n":
            self.listing = False
        elif self.listing and re.fullmatch(rb"\d+ \d+\r\n", line):
            line = line.split()[0] + b" 100\r\n"
        return line


async def test_a_message_larger_than_listed_fails_the_session_after_the_batch_before_it_is_kept(
        settings, registry, org, dovecot, pool):
    liar = ListLiar()
    await liar.start(dovecot.host, dovecot.pop3_port)
    try:
        await registry.add_profile(org, imap_profile(dovecot, "liar-pop3", server_type="pop3", incoming_port=liar.port))
        box = await ready_mailbox(registry, org, dovecot, profile="liar-pop3")
        line = b"x" * 998 + b"\r\n"
        huge = message("huge", body="") + line * (MAX_MESSAGE_BYTES // len(line) + 1024)
        dovecot.deliver_many(box.email, [message("first"), message("second"), huge, message("after")])
        for session in range(1, 5):
            await without_backoff(pool, box)
            await ingest(settings)
            async with pool.acquire() as conn:
                subjects = await conn.fetchval("SELECT count(*) FROM ingested_message WHERE mailbox_id = $1", box.id)
            # before: the batch read before the huge message was thrown away, every session
            # (skipped after its third refusal; "after" comes at the session after that one)
            assert subjects == (2 if session < 4 else 3), session
        state = await registry.mailbox(org, box.email)
        assert "200 MiB" in state.incoming.test_message or any("200 MiB" in a.message for a in state.alerts)
    finally:
        liar.server.close()


# ---- 5. copies found before deletion was switched on ---------------------------------------------


async def test_a_copy_found_before_deletion_was_switched_on_goes_with_its_message(settings, registry, org, dovecot, pool):
    await registry.add_profile(org, pop3_profile(dovecot, "cp-pop3"))
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", profile="cp-pop3")
    twice = message("delivered twice", message_id=f"<twice-{uuid.uuid4().hex[:8]}@customer.example>")
    dovecot.deliver_many(queue.email, [twice, twice])
    await pipeline(settings)
    await registry.update_mailbox(org, queue.email, delete_after_processing=True)
    await ingest(settings)
    assert dovecot.message_count(queue.email) == 0


# ---- 6. DELE pipelined ---------------------------------------------------------------------------


async def test_deles_are_pipelined(settings, registry, org, dovecot, pool, monkeypatch):
    await registry.add_profile(org, pop3_profile(dovecot, "many-pop3"))
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", profile="many-pop3", delete_after_processing=True)
    dovecot.deliver_many(queue.email, [message(f"m{i}") for i in range(40)])
    await pipeline(settings)
    writes = []
    write = MailConnection.write

    def counting(self, data: bytes) -> None:
        if data.startswith(b"DELE"):
            writes.append(data.count(b"DELE"))
        write(self, data)
    monkeypatch.setattr(MailConnection, "write", counting)
    await ingest(settings)
    assert dovecot.message_count(queue.email) == 0
    assert sum(writes) == 40 and len(writes) <= 2, writes
