"""IMAP ingest with CONDSTORE/QRESYNC (RFC 7162) against a real Dovecot, watched on the wire.

Ingest talks to Dovecot through `WireTap`, a loopback relay that keeps every byte both ways, so the
tests assert on what really crossed the wire (which commands, how many bytes) rather than on which
client methods ran.  Other IMAP sessions (imaplib, straight to Dovecot) play the other mail clients
that expunge messages, change flags and rebuild folders.  A second Dovecot of this module's own
advertises less (`imap_capability`), for the servers that offer CONDSTORE only, or neither.
"""
from __future__ import annotations

import asyncio
import imaplib
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from conduit.peers.dovecot import Dovecot
from services.evaluate.service import EvaluateService
from services.ingest.imap_client import ImapClient, ImapCommandFailed
from services.ingest.imap_sync import ImapFolderSync
from services.ingest.publishing import Mailbox
from services.ingest.service import IngestService
from shared.errors import ConnectionFailed
from shared.lifecycle import run_service
from tests.support.mailboxes import ReadyMailbox, imap_profile, message, ready_mailbox
from tests.support.relay import line_relay
from tests.support.topics import read_topic
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers


# -- the wire ------------------------------------------------------------------------------------


@dataclass
class _Session:
    number: int
    sent: bytearray = field(default_factory=bytearray)       # client -> server
    received: bytearray = field(default_factory=bytearray)   # server -> client


@dataclass(frozen=True)
class Traffic:
    """What crossed the wire: the client's command lines (tags removed) and the bytes both ways."""

    commands: list[str]
    client_text: bytes
    server_text: bytes

    @property
    def verbs(self) -> list[str]:
        """Each command's name ("UID FETCH", "EXAMINE")."""
        return [" ".join(c.split(" ", 2)[:2]) if c.upper().startswith("UID ") else c.split(" ", 1)[0]
                for c in self.commands]

    @property
    def sent(self) -> int:
        return len(self.client_text)

    @property
    def received(self) -> int:
        return len(self.server_text)


class WireTap:
    """A TCP relay on loopback in front of an IMAP server that records each session's bytes.

    A byte is recorded before it is passed on, so once the client has its answer, the command and
    the answer are both in the record: no waiting needed to read it.  With ``cut_at`` set, the next
    session is cut off (both ways) just before the server's bytes first match that pattern, as when
    the network fails in the middle of a response."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self.sessions: list[_Session] = []
        self.port = 0
        self.cut_at: re.Pattern[bytes] | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _Session(len(self.sessions))
        self.sessions.append(session)
        cut_at, self.cut_at = self.cut_at, None
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bytearray,
                       cut: re.Pattern[bytes] | None) -> None:
            try:
                while data := await src.read(65536):
                    match = cut.search(bytes(record[-200:]) + data) if cut else None
                    if match:
                        data = data[:max(0, match.start() - len(record[-200:]))]
                    record += data
                    dst.write(data)
                    await dst.drain()
                    if match:
                        break
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()
                if cut:
                    writer.close()
                    up_writer.close()

        await asyncio.gather(pipe(reader, up_writer, session.sent, None),
                             pipe(up_reader, writer, session.received, cut_at))

    def mark(self) -> tuple[int, int, int]:
        return len(self.sessions), *(self._lengths())

    def _lengths(self) -> tuple[int, int]:
        return sum(len(s.sent) for s in self.sessions), sum(len(s.received) for s in self.sessions)

    def since(self, mark: tuple[int, int, int]) -> Traffic:
        """The traffic of the latest session after ``mark`` (taken while that session was the latest)."""
        assert len(self.sessions) == mark[0], "a new session opened since the mark"
        sent_total, received_total = self._lengths()
        latest = self.sessions[-1]
        sent = bytes(latest.sent[len(latest.sent) - (sent_total - mark[1]):])
        received = bytes(latest.received[len(latest.received) - (received_total - mark[2]):])
        return _traffic(sent, received)

    def session(self, number: int) -> Traffic:
        """Everything of one session (0 is the first)."""
        return _traffic(bytes(self.sessions[number].sent), bytes(self.sessions[number].received))


def _traffic(sent: bytes, received: bytes) -> Traffic:
    commands = [m.group(1).decode() for m in re.finditer(rb"(?m)^C\d+ ([^\r\n]*)\r?$", sent)]
    return Traffic(commands, sent, received)


@pytest.fixture
async def tap(dovecot) -> AsyncIterator[WireTap]:
    relay = WireTap(dovecot.host, dovecot.imap_port)
    await relay.start()
    yield relay
    await relay.stop()


# -- a Dovecot that offers less --------------------------------------------------------------------


class _LimitedDovecot(Dovecot):
    """Dovecot advertising exactly ``capability`` (its `imap_capability` setting), before and after login."""

    def __init__(self, base_dir: Path, capability: str) -> None:
        super().__init__(base_dir)
        self.capability = capability

    def _write_config(self) -> None:
        super()._write_config()
        with open(self.config_path, "a") as config:
            config.write(f"# test_qresync: a server without some of RFC 7162\nimap_capability = {self.capability}\n")


_BASE_CAPABILITY = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ UIDPLUS MOVE UNSELECT"
_LIMITED = {"neither": _BASE_CAPABILITY, "condstore": _BASE_CAPABILITY + " CONDSTORE",
            "no-uidplus": _BASE_CAPABILITY.replace(" UIDPLUS", "")}


@pytest.fixture(scope="module")
async def limited_dovecots() -> AsyncIterator[dict[str, Dovecot]]:
    servers: dict[str, Dovecot] = {}
    try:
        for name, capability in _LIMITED.items():
            # Short and world-traversable: Dovecot's sockets and mail live right there.
            server = _LimitedDovecot(Path(tempfile.mkdtemp(prefix=f"cq-{name[:4]}-")), capability)
            await server.start()
            servers[name] = server
        yield servers
    finally:
        for server in servers.values():
            await server.stop()
            shutil.rmtree(server.base_dir, ignore_errors=True)


# -- helpers -------------------------------------------------------------------------------------


@dataclass
class Setup:
    box: ReadyMailbox
    mailbox: Mailbox
    sync: ImapFolderSync
    client: ImapClient


@pytest.fixture
async def setup(registry, org, dovecot, tap, pool, publisher) -> AsyncIterator[Setup]:
    """A ready mailbox on the session's Dovecot, and an ingest session to it through the tap."""
    box = await ready_mailbox(registry, org, dovecot)
    client = await tapped_session(tap, box)
    yield Setup(box, Mailbox(box.id, org.id, False), ImapFolderSync(pool, publisher, Mailbox(box.id, org.id, False)),
                client)
    await client.logout()


async def tapped_session(tap, box: ReadyMailbox) -> ImapClient:
    """An ingest session to ``box`` through the tap, logged in."""
    client = await ImapClient.connect("127.0.0.1", tap.port, tls="none", timeout=10)
    await client.login(box.email, box.password)
    return client


async def sync_cut_at_uid(tap: WireTap, sync: ImapFolderSync, box: ReadyMailbox, folder: str, uid: int) -> None:
    """A sync whose connection breaks as the server sends message ``uid``."""
    tap.cut_at = re.compile(rb"\(UID %d " % uid)
    broken = await tapped_session(tap, box)
    with pytest.raises(ConnectionFailed):
        await sync.sync(broken, [folder])
    await broken.close()


async def sync_folder_again(tap: WireTap, sync: ImapFolderSync, box: ReadyMailbox, folder: str) -> tuple[int, Traffic]:
    """The next session's sync of ``folder``: how many messages it published, and its traffic."""
    resumed = await tapped_session(tap, box)
    try:
        mark = tap.mark()
        published = await sync.sync_folder(resumed, folder)
        return published, tap.since(mark)
    finally:
        await resumed.logout()


def other_client(dovecot, box: ReadyMailbox, action: Callable[[imaplib.IMAP4], None]) -> Callable[[], None]:
    """Another mail client's session, straight to Dovecot (not through the tap)."""
    def run() -> None:
        with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=30) as imap:
            imap.login(box.email, box.password)
            action(imap)
            imap.logout()
    return run


def expunge(*uids: int, folder: str = "INBOX") -> Callable[[imaplib.IMAP4], None]:
    def action(imap: imaplib.IMAP4) -> None:
        assert imap.select(folder)[0] == "OK"
        assert imap.uid("STORE", ",".join(map(str, uids)), "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
        assert imap.expunge()[0] == "OK"
    return action


def expunge_flagged(imap: imaplib.IMAP4) -> None:
    assert imap.select("INBOX")[0] == "OK"
    assert imap.expunge()[0] == "OK"


def add_flags(uid_set: str, flags: str) -> Callable[[imaplib.IMAP4], None]:
    def action(imap: imaplib.IMAP4) -> None:
        assert imap.select("INBOX")[0] == "OK"
        assert imap.uid("STORE", uid_set, "+FLAGS.SILENT", flags)[0] == "OK"
    return action


async def ingested(pool: asyncpg.Pool, box: ReadyMailbox, folder: str = "INBOX") -> dict[int, bool]:
    """{uid: removed_from_server} of the mailbox's ingested messages from ``folder``."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT uid, removed_from_server FROM ingested_message WHERE mailbox_id = $1 "
                                "AND folder = $2", box.id, folder)
    return {r["uid"]: r["removed_from_server"] for r in rows}


async def saved_state(pool: asyncpg.Pool, box: ReadyMailbox, folder: str = "INBOX") -> asyncpg.Record:
    async with pool.acquire() as conn:
        return await conn.fetchrow("SELECT uidvalidity, last_uid, highestmodseq, updated_at FROM imap_folder_state "
                                   "WHERE mailbox_id = $1 AND folder = $2", box.id, folder)


async def server_view(dovecot, box: ReadyMailbox, folder: str = "INBOX") -> tuple[int, int]:
    """(UIDVALIDITY, HIGHESTMODSEQ) of ``folder`` now, asked by a session of its own."""
    client = await ImapClient.connect(dovecot.host, dovecot.imap_port, tls="none", timeout=10)
    try:
        await client.login(box.email, box.password)
        assert await client.enable_qresync()
        status = await client.select(folder)
        return status.uidvalidity, status.highestmodseq
    finally:
        await client.logout()


def qresync_params(command: str) -> tuple[int, int, str] | None:
    match = re.search(r"\(QRESYNC \((\d+) (\d+)(?: ([\d:,]+))?\)\)", command)
    return (int(match.group(1)), int(match.group(2)), match.group(3) or "") if match else None


# -- QRESYNC ---------------------------------------------------------------------------------------


async def test_unchanged_folder_costs_only_the_select(setup: Setup, tap: WireTap, dovecot, pool, settings) -> None:
    dovecot.deliver_many(setup.box.email, [message(f"m{i}") for i in range(3)])
    assert await setup.sync.sync(setup.client, ["INBOX"]) == 3
    first = tap.session(0)
    assert first.verbs.count("ENABLE") == 1 and "ENABLE QRESYNC" in first.commands
    before = await saved_state(pool, setup.box)
    assert before["highestmodseq"] == (await server_view(dovecot, setup.box))[1]

    for _ in range(2):
        mark = tap.mark()
        assert await setup.sync.sync(setup.client, ["INBOX"]) == 0
        poll = tap.since(mark)
        assert poll.verbs == ["EXAMINE"], poll.commands
        assert qresync_params(poll.commands[0]) == (before["uidvalidity"], before["highestmodseq"], "1:3")
    print(f"\nunchanged folder, QRESYNC: {len(poll.commands)} command, {poll.sent} B sent, {poll.received} B received")
    assert (await saved_state(pool, setup.box))["updated_at"] == before["updated_at"], "nothing written either"
    assert len(await read_topic(settings, "email.received", 3, timeout=3)) == 3


async def test_messages_expunged_elsewhere_are_recorded_as_vanished(setup: Setup, tap: WireTap, dovecot, pool) -> None:
    dovecot.deliver_many(setup.box.email, [message(f"m{i}") for i in range(5)])
    dovecot.deliver_many(setup.box.email, [message(f"p{i}") for i in range(5)], folder="Projects")
    assert await setup.sync.sync(setup.client, ["Projects", "INBOX"]) == 10
    assert await ingested(pool, setup.box) == {uid: False for uid in range(1, 6)}
    before = await saved_state(pool, setup.box)

    await asyncio.to_thread(other_client(dovecot, setup.box, expunge(2, 4)))
    mark = tap.mark()
    assert await setup.sync.sync_folder(setup.client, "INBOX") == 0
    poll = tap.since(mark)
    assert poll.verbs == ["EXAMINE"], "the vanished UIDs came with the EXAMINE: no SEARCH, no FETCH"
    assert b"VANISHED (EARLIER) 2,4" in poll.server_text
    assert await ingested(pool, setup.box) == {1: False, 2: True, 3: False, 4: True, 5: False}
    assert await ingested(pool, setup.box, "Projects") == {uid: False for uid in range(1, 6)}, "other folders keep theirs"
    after = await saved_state(pool, setup.box)
    assert after["highestmodseq"] > before["highestmodseq"]
    assert after["highestmodseq"] == (await server_view(dovecot, setup.box))[1]
    assert after["last_uid"] == 5


async def test_flags_changed_elsewhere_ingest_nothing_again(setup: Setup, tap: WireTap, dovecot, pool, settings) -> None:
    dovecot.deliver_many(setup.box.email, [message(f"m{i}") for i in range(3)])
    assert await setup.sync.sync(setup.client, ["INBOX"]) == 3
    before = await saved_state(pool, setup.box)

    await asyncio.to_thread(other_client(dovecot, setup.box, add_flags("1:3", "(\\Seen \\Flagged)")))
    mark = tap.mark()
    assert await setup.sync.sync_folder(setup.client, "INBOX") == 0
    poll = tap.since(mark)
    assert poll.verbs == ["EXAMINE"], poll.commands
    assert poll.server_text.count(b" FETCH (") == 3, "the server reported the three flag changes"
    assert await ingested(pool, setup.box) == {1: False, 2: False, 3: False}
    after = await saved_state(pool, setup.box)
    assert after["highestmodseq"] > before["highestmodseq"] and after["last_uid"] == 3
    assert len(await read_topic(settings, "email.received", 3, timeout=3)) == 3, "no event twice"

    mark = tap.mark()   # the flag changes are behind us: the next poll hears of nothing
    await setup.sync.sync_folder(setup.client, "INBOX")
    assert b"FETCH" not in tap.since(mark).server_text


async def test_a_restarted_ingest_resumes_at_the_saved_modseq(settings, registry, org, dovecot, tap, pool) -> None:
    # The whole service, twice, as after a restart: each run is a new session through the tap.
    await registry.add_profile(org, imap_profile(dovecot, incoming_host="127.0.0.1", incoming_port=tap.port))
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver_many(box.email, [message(f"m{i}") for i in range(4)])
    await run_service(IngestService(settings), burst=True)
    saved = await saved_state(pool, box)
    assert saved["last_uid"] == 4 and saved["highestmodseq"]

    await asyncio.to_thread(other_client(dovecot, box, expunge(1)))
    dovecot.deliver_many(box.email, [message("late 1"), message("late 2")])
    await run_service(IngestService(settings), burst=True)
    second = tap.session(-1)
    assert second.verbs[:3] == ["LOGIN", "ENABLE", "EXAMINE"] and second.commands[1] == "ENABLE QRESYNC"
    assert qresync_params(second.commands[2]) == (saved["uidvalidity"], saved["highestmodseq"], "1:4")
    assert [c for c in second.commands if c.startswith("UID FETCH")] == [
        "UID FETCH 5:6 (UID FLAGS INTERNALDATE BODY.PEEK[] MODSEQ)"]
    events = await read_topic(settings, "email.received", 6)
    assert len(events) == 6 and len({e["data"]["message_id"] for e in events}) == 6
    assert await ingested(pool, box) == {1: True, 2: False, 3: False, 4: False, 5: False, 6: False}
    resumed = await saved_state(pool, box)
    assert (resumed["last_uid"], resumed["highestmodseq"]) == (6, (await server_view(dovecot, box))[1])


async def test_a_queue_does_not_delete_what_vanished_again(settings, registry, org, dovecot, tap, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot, incoming_host="127.0.0.1", incoming_port=tap.port))
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", delete_after_processing=True)
    dovecot.deliver_many(queue.email, [message(f"q{i}") for i in range(3)])
    await run_service(IngestService(settings), burst=True)
    await asyncio.to_thread(other_client(dovecot, queue, expunge(2)))      # someone else cleaned up
    await run_service(IngestService(settings), burst=True)
    assert await ingested(pool, queue) == {1: False, 2: True, 3: False}, \
        [(t.commands, t.server_text[-400:]) for t in map(tap.session, range(len(tap.sessions)))]

    await run_service(EvaluateService(settings), burst=True)                # all three decided on
    await run_service(IngestService(settings), burst=True)
    deleting = tap.session(-1)
    assert [c for c in deleting.commands if c.startswith(("UID STORE", "UID EXPUNGE"))] == \
        ["UID STORE 1,3 +FLAGS.SILENT (\\Deleted)", "UID EXPUNGE 1,3"]
    assert dovecot.message_count(queue.email) == 0
    assert await ingested(pool, queue) == {1: True, 2: True, 3: True}


async def test_an_interrupted_sync_keeps_the_old_modseq_until_all_it_stands_for_is_saved(
        registry, org, dovecot, tap, pool, publisher, settings) -> None:
    box = await ready_mailbox(registry, org, dovecot)
    sync = ImapFolderSync(pool, publisher, Mailbox(box.id, org.id, False))

    dovecot.deliver_many(box.email, [message(f"m{i}") for i in range(5)])
    first = await tapped_session(tap, box)
    assert await sync.sync(first, ["INBOX"]) == 5
    await first.logout()
    before = await saved_state(pool, box)

    await asyncio.to_thread(other_client(dovecot, box, expunge(2)))
    dovecot.deliver_many(box.email, [message(f"n{i}") for i in range(700)])   # UIDs 6..705
    # The connection breaks in the second UID FETCH chunk, after the first batch (6..505) was read.
    await sync_cut_at_uid(tap, sync, box, "INBOX", 600)
    interrupted = await saved_state(pool, box)
    assert interrupted["last_uid"] == 505, "the batch read before the break was saved"
    assert interrupted["highestmodseq"] == before["highestmodseq"], "but not the modseq: it also stands for UID 2"
    assert (await ingested(pool, box))[2] is False

    published, again = await sync_folder_again(tap, sync, box, "INBOX")
    assert published == 200
    assert again.verbs == ["ENABLE", "EXAMINE", "UID SEARCH", "UID FETCH"]
    assert qresync_params(again.commands[1]) == (before["uidvalidity"], before["highestmodseq"], "1:505")
    assert b"VANISHED (EARLIER) 2\r\n" in again.server_text
    assert (await ingested(pool, box))[2] is True
    saved = await saved_state(pool, box)
    assert (saved["last_uid"], saved["highestmodseq"]) == (705, (await server_view(dovecot, box))[1])
    events = await read_topic(settings, "email.received", 705)
    assert len(events) == 705 and len({e["data"]["message_id"] for e in events}) == 705


async def test_uidvalidity_change_resyncs_everything_once(setup: Setup, tap: WireTap, dovecot, pool, settings) -> None:
    raws = [message(f"a{i}") for i in range(3)]
    for raw in raws:
        await dovecot.append(setup.box.email, setup.box.password, raw, folder="Archive")
    assert await setup.sync.sync(setup.client, ["Archive"]) == 3
    old = await saved_state(pool, setup.box, "Archive")

    # Another client rebuilds the folder: the same three messages and a new one, renumbered.
    await asyncio.to_thread(other_client(dovecot, setup.box, lambda imap: imap.delete('"Archive"')))
    for raw in [*raws, message("new in archive")]:
        await dovecot.append(setup.box.email, setup.box.password, raw, folder="Archive")
    uidvalidity, modseq = await server_view(dovecot, setup.box, "Archive")
    assert uidvalidity != old["uidvalidity"]

    mark = tap.mark()
    assert await setup.sync.sync_folder(setup.client, "Archive") == 1
    resync = tap.since(mark)
    assert resync.verbs == ["EXAMINE", "UID SEARCH", "UID FETCH"]
    assert resync.commands[1] == "UID SEARCH UID 1:*", "read again from the first UID"
    assert b"VANISHED" not in resync.server_text, "the old numbering's parameters were ignored"
    events = await read_topic(settings, "email.received", 4)
    assert len(events) == 4 and len({e["data"]["message_id"] for e in events}) == 4
    saved = await saved_state(pool, setup.box, "Archive")
    assert (saved["uidvalidity"], saved["last_uid"], saved["highestmodseq"]) == (uidvalidity, 4, modseq)
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT uid, uidvalidity, removed_from_server FROM ingested_message "
                                "WHERE mailbox_id = $1 AND folder = 'Archive' ORDER BY uid", setup.box.id)
    # The messages found again take their new UIDs: nothing keeps pointing into the old numbering.
    assert [(r["uid"], r["uidvalidity"], r["removed_from_server"]) for r in rows] == \
        [(uid, uidvalidity, False) for uid in (1, 2, 3, 4)]

    mark = tap.mark()   # from now on the new numbering's parameters, and nothing else to do
    assert await setup.sync.sync_folder(setup.client, "Archive") == 0
    poll = tap.since(mark)
    assert poll.verbs == ["EXAMINE"] and qresync_params(poll.commands[0]) == (uidvalidity, modseq, "1:4")


async def test_an_interrupted_resync_never_pairs_the_new_uidvalidity_with_the_old_modseq(
        registry, org, dovecot, tap, pool, publisher, settings) -> None:
    box = await ready_mailbox(registry, org, dovecot)
    sync = ImapFolderSync(pool, publisher, Mailbox(box.id, org.id, False))

    dovecot.deliver_many(box.email, [message(f"a{i}") for i in range(3)], folder="Archive")
    first = await tapped_session(tap, box)
    assert await sync.sync(first, ["Archive"]) == 3
    await first.logout()
    old = await saved_state(pool, box, "Archive")
    await asyncio.to_thread(other_client(dovecot, box, lambda imap: imap.delete('"Archive"')))
    dovecot.deliver_many(box.email, [message(f"b{i}") for i in range(600)], folder="Archive")
    uidvalidity, _ = await server_view(dovecot, box, "Archive")
    assert uidvalidity != old["uidvalidity"]

    await sync_cut_at_uid(tap, sync, box, "Archive", 550)       # in the second chunk of the resync
    interrupted = await saved_state(pool, box, "Archive")
    assert (interrupted["uidvalidity"], interrupted["last_uid"], interrupted["highestmodseq"]) == \
        (uidvalidity, 500, None), "the old numbering's modseq means nothing in the new one"

    published, again = await sync_folder_again(tap, sync, box, "Archive")
    assert published == 100
    assert again.verbs == ["ENABLE", "EXAMINE", "UID SEARCH", "UID FETCH"]
    assert again.commands[1] == 'EXAMINE "Archive"', "no QRESYNC parameters without a modseq of this numbering"
    saved = await saved_state(pool, box, "Archive")
    assert (saved["uidvalidity"], saved["last_uid"]) == (uidvalidity, 600) and saved["highestmodseq"]
    events = await read_topic(settings, "email.received", 603)
    assert len(events) == 603 and len({e["data"]["message_id"] for e in events}) == 603


async def test_a_queue_never_deletes_by_uids_of_an_earlier_numbering(settings, registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", delete_after_processing=True,
                                tracked_folders=["Archive"])
    first, second, newcomer = message("first"), message("second"), message("not yet processed")
    for raw in (first, second):
        await dovecot.append(queue.email, queue.password, raw, folder="Archive")      # UIDs 1, 2
    await run_service(IngestService(settings), burst=True)
    # Rebuilt: UID 1 is now a message nobody has processed; the two known ones are UIDs 2 and 3.
    await asyncio.to_thread(other_client(dovecot, queue, lambda imap: imap.delete('"Archive"')))
    for raw in (newcomer, second, first):
        await dovecot.append(queue.email, queue.password, raw, folder="Archive")
    await run_service(EvaluateService(settings), burst=True)    # "first" and "second" decided on

    await run_service(IngestService(settings), burst=True)
    assert dovecot.message_count(queue.email, "Archive") == 3, "nothing deleted by the old UIDs 1 and 2"
    async with pool.acquire() as conn:
        uids = {r["subject"]: r["uid"] for r in await conn.fetch(
            """SELECT d.subject, im.uid FROM ingested_message im JOIN email_decision d
               ON d.mailbox_id = im.mailbox_id AND d.message_id = im.message_key WHERE im.mailbox_id = $1""", queue.id)}
    assert uids == {"first": 3, "second": 2}, "the decided messages found again under their new UIDs"

    await run_service(IngestService(settings), burst=True)      # now deleted by their new UIDs
    assert dovecot.message_count(queue.email, "Archive") == 1
    await run_service(EvaluateService(settings), burst=True)
    await run_service(IngestService(settings), burst=True)
    assert dovecot.message_count(queue.email, "Archive") == 0


async def test_idle_with_qresync_hears_new_mail_and_expunges(setup: Setup, tap: WireTap, dovecot, pool) -> None:
    dovecot.deliver_many(setup.box.email, [message(f"m{i}") for i in range(2)])
    # Another session sees them first and so takes their \\Recent: their expunge changes no RECENT
    # count of ours, and VANISHED is all that is left to wake IDLE (IMAP4rev2 servers send no RECENT).
    await asyncio.to_thread(other_client(dovecot, setup.box, lambda imap: imap.select("INBOX")))
    assert await setup.sync.sync(setup.client, ["INBOX"]) == 2
    assert setup.client.qresync_enabled
    client = setup.client

    waiting = asyncio.create_task(client.idle(20))
    await eventually(lambda: _true(client.idling), timeout=10, what="IDLE")
    await dovecot.append(setup.box.email, setup.box.password, message("pushed"))
    assert await asyncio.wait_for(waiting, 15) is True
    assert await setup.sync.sync_folder(client, "INBOX") == 1

    # Flagged \\Deleted first (that change is heard now), so that only the expunge can end the IDLE.
    await asyncio.to_thread(other_client(dovecot, setup.box, add_flags("1", "(\\Deleted)")))
    assert await client.noop() is True
    mark = tap.mark()
    waiting = asyncio.create_task(client.idle(20))
    await eventually(lambda: _true(client.idling), timeout=10, what="IDLE again")
    await asyncio.to_thread(other_client(dovecot, setup.box, expunge_flagged))
    assert await asyncio.wait_for(waiting, 15) is True
    during = tap.since(mark)
    assert b"* VANISHED 1\r\n" in during.server_text and b"EXPUNGE" not in during.server_text
    assert not re.search(rb"FETCH|RECENT|EXISTS", during.server_text), during.server_text
    assert during.verbs == ["IDLE"] and during.client_text.endswith(b"IDLE\r\nDONE\r\n")
    assert await client.noop() is False, "in step after DONE: the VANISHED was consumed by IDLE"
    assert await setup.sync.sync_folder(client, "INBOX") == 0
    assert await ingested(pool, setup.box) == {1: True, 2: False, 3: False}


async def _true(value: bool) -> bool:
    return value


# -- servers without QRESYNC -------------------------------------------------------------------------


@pytest.mark.parametrize("offer", ["neither", "condstore"])
async def test_servers_without_qresync_ingest_the_same(offer: str, limited_dovecots, registry, org, pool, publisher,
                                                       settings) -> None:
    server = limited_dovecots[offer]
    relay = WireTap(server.host, server.imap_port)
    await relay.start()
    box = await ready_mailbox(registry, org, server)
    sync = ImapFolderSync(pool, publisher, Mailbox(box.id, org.id, False))
    client = await ImapClient.connect("127.0.0.1", relay.port, tls="none", timeout=10)
    try:
        await client.login(box.email, box.password)
        assert "QRESYNC" not in client.capabilities
        server.deliver_many(box.email, [message(f"m{i}") for i in range(5)])
        assert await sync.sync(client, ["INBOX"]) == 5

        await asyncio.to_thread(other_client(server, box, expunge(2)))
        await asyncio.to_thread(other_client(server, box, add_flags("3", "(\\Seen)")))
        server.deliver(box.email, message("late"))
        assert await sync.sync(client, ["INBOX"]) == 1
        mark = relay.mark()
        assert await sync.sync(client, ["INBOX"]) == 0
        poll = relay.since(mark)
        assert poll.verbs == ["EXAMINE"] and "QRESYNC" not in poll.commands[0], poll.commands
        print(f"\nunchanged folder, {offer}: {len(poll.commands)} command, {poll.sent} B sent, "
              f"{poll.received} B received")

        everything = relay.session(0)
        assert not any("QRESYNC" in c for c in everything.commands)
        assert [c for c in everything.commands if c.startswith("ENABLE")] == \
            (["ENABLE CONDSTORE"] if offer == "condstore" else [])
        saved = await saved_state(pool, box)
        assert saved["last_uid"] == 6
        assert (saved["highestmodseq"] is not None) == (offer == "condstore")
        events = await read_topic(settings, "email.received", 6)
        assert len(events) == 6 and len({e["data"]["message_id"] for e in events}) == 6
        assert set(await ingested(pool, box)) == {1, 2, 3, 4, 5, 6}
    finally:
        await client.logout()
        await relay.stop()


async def test_without_uidplus_a_queue_removes_its_messages_and_no_one_elses(limited_dovecots) -> None:
    """Plain EXPUNGE removes every message flagged \\Deleted: another client's flagged mail (a user
    who marks mail to purge later) keeps its flag and stays; only ours is removed."""
    server = limited_dovecots["no-uidplus"]
    email, password = f"nouidplus-{uuid.uuid4().hex[:8]}@example.com", "pw"
    server.add_user(email, password)
    server.deliver_many(email, [message(f"m{i}") for i in range(5)])
    client = await ImapClient.connect(server.host, server.imap_port, tls="none", timeout=10)
    try:
        await client.login(email, password)
        assert "UIDPLUS" not in client.capabilities
        await client.select("INBOX", readonly=False)
        await client.mark_deleted([2, 4])          # the user's client flags 2 and 4, to purge later
        await client.mark_deleted([1, 3])          # ours, processed
        await client.expunge([1, 3])
        assert await client.uids_since(0) == [2, 4, 5]
        flags = {m.uid: m.flags async for m in client.fetch([2, 4, 5])}
        assert "\\Deleted" in flags[2] and "\\Deleted" in flags[4] and "\\Deleted" not in flags[5]
    finally:
        await client.logout()


async def test_without_uidplus_a_refused_expunge_gives_other_clients_their_flags_back(limited_dovecots) -> None:
    """The server refuses the EXPUNGE (no expunge right, a quota): the \\Deleted flags taken off
    other clients' messages for it are put back, and the refusal is reported."""
    server = limited_dovecots["no-uidplus"]
    email, password = f"nouidplus-{uuid.uuid4().hex[:8]}@example.com", "pw"
    server.add_user(email, password)
    server.deliver_many(email, [message(f"m{i}") for i in range(5)])

    def refuse_expunge(line: bytes) -> bytes | None:
        """A plain EXPUNGE is answered NO in the server's place, as by one without the right to expunge."""
        refused = re.fullmatch(rb"(\S+) EXPUNGE\r\n", line)
        return refused.group(1) + b" NO [CANNOT] Expunge not allowed here\r\n" if refused else None

    relay, port = await line_relay(server.host, server.imap_port, refuse_expunge)
    client = await ImapClient.connect("127.0.0.1", port, tls="none", timeout=10)
    try:
        await client.login(email, password)
        await client.select("INBOX", readonly=False)
        await client.mark_deleted([2, 4])          # the user's client flags 2 and 4, to purge later
        await client.mark_deleted([1, 3])          # ours, processed
        with pytest.raises(ImapCommandFailed, match="CANNOT"):
            await client.expunge([1, 3])
        flags = {m.uid: m.flags async for m in client.fetch([1, 2, 3, 4, 5])}
        assert all("\\Deleted" in flags[uid] for uid in (1, 2, 3, 4)), flags
    finally:
        await client.logout()
        relay.close()
