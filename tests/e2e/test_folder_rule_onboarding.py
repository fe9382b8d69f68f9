"""A folder-level tracking rule added to a folder ingest has read already files the mail still there
(the reference's onboarding of a rule), and only that: a message deleted, flagged deleted or moved
out of the folder on the server before the rule was added is not filed, on a server with QRESYNC and
on one without (Gmail, Exchange IMAP), where Conduit never learns of expunges.  Ingest and evaluate
run for real, in burst mode, against Dovecot."""
from __future__ import annotations

import asyncio
import imaplib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from conduit.peers.dovecot import Dovecot
from shared.registry.service import Registry
from tests.e2e.test_folder_tracking import pipeline, regarding
from tests.support.mailboxes import imap_profile, message, ready_mailbox
from tests.support.topics import read_topic

pytestmark = pytest.mark.peers


class _DovecotWithoutQresync(Dovecot):
    """Dovecot advertising neither CONDSTORE nor QRESYNC, as Gmail and Exchange IMAP do not."""

    def _write_config(self) -> None:
        super()._write_config()
        with open(self.config_path, "a") as config:
            config.write("imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ UIDPLUS MOVE UNSELECT\n")


@pytest.fixture(scope="module")
async def without_qresync() -> AsyncIterator[Dovecot]:
    server = _DovecotWithoutQresync(Path(tempfile.mkdtemp(prefix="onb-")))
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
        shutil.rmtree(server.base_dir, ignore_errors=True)


@pytest.fixture(params=["qresync", "without-qresync"])
def server(request, dovecot, without_qresync) -> Dovecot:
    return dovecot if request.param == "qresync" else without_qresync


def _imap(server: Dovecot, box, action: Callable[[imaplib.IMAP4], None]) -> Callable[[], None]:
    """Another mail client's session (the user's), straight to the server."""
    def run() -> None:
        with imaplib.IMAP4(server.host, server.imap_port, timeout=30) as imap:
            imap.login(box.email, box.password)
            action(imap)
            imap.logout()
    return run


def _uid_of(imap: imaplib.IMAP4, message_id: str) -> bytes:
    typ, data = imap.uid("SEARCH", "HEADER", "Message-ID", message_id)
    assert typ == "OK" and len(data[0].split()) == 1, data
    return data[0].strip()


def _the_users_changes(imap: imaplib.IMAP4) -> None:
    """In Projects: one message deleted (expunged), one flagged deleted and left there (a client
    that purges later), one moved to a folder Conduit does not track.  From the Inbox: one message
    moved into Projects, one into Beta (which no one tracks yet)."""
    assert imap.select("Projects")[0] == "OK"
    assert imap.uid("STORE", _uid_of(imap, "<gone-1@stranger.example>"), "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
    assert imap.expunge()[0] == "OK"
    assert imap.uid("STORE", _uid_of(imap, "<flagged-1@stranger.example>"), "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
    assert imap.create("Archive")[0] == "OK"
    assert imap.uid("MOVE", _uid_of(imap, "<moved-out-1@stranger.example>"), "Archive")[0] == "OK"
    assert imap.select("INBOX")[0] == "OK"
    assert imap.uid("MOVE", _uid_of(imap, "<moved-in-1@stranger.example>"), "Projects")[0] == "OK"
    assert imap.create("Beta")[0] == "OK"
    assert imap.uid("MOVE", _uid_of(imap, "<moved-new-1@stranger.example>"), "Beta")[0] == "OK"


async def test_a_rule_added_to_a_folder_read_before_files_the_mail_still_there(
        settings, registry: Registry, org, server: Dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(server))
    acme = await registry.add_record(org, "account", "Acme", "info@acme.example")
    beta = await registry.add_record(org, "account", "Beta", "info@beta.example")
    # "Known records": a stranger's mail is not tracked, except where a folder rule says so.
    box = await ready_mailbox(registry, org, server, tracking="known_records", tracked_folders=["INBOX", "Projects"])
    in_projects = ["kept-1", "kept-2", "gone-1", "flagged-1", "moved-out-1"]
    in_inbox = ["inbox-1", "moved-in-1", "moved-new-1"]
    for names, folder in ((in_projects, "Projects"), (in_inbox, "INBOX")):
        for name in names:
            await server.append(box.email, box.password, message(name, sender="buyer@stranger.example",
                                                                 message_id=f"<{name}@stranger.example>"), folder=folder)
    await pipeline(settings)
    for name in in_projects + in_inbox:
        assert await regarding(pool, org, f"{name}@stranger.example") is None   # a stranger's: not tracked
    before = await read_topic(settings, "email.received", 8)
    assert len(before) == 8

    # The user deletes and moves mail out of the folder, and moves two messages from the Inbox: one
    # into it, one into a folder not tracked yet.  No sync runs until the rules are added, so even
    # with QRESYNC Conduit learns of it only at the onboarding.
    await asyncio.to_thread(_imap(server, box, _the_users_changes))
    _, added = await registry.add_folder_rule(org, box.email, "Projects", f"account:{acme.id}")
    assert not added   # tracked and read already: the onboarding is what files its mail
    _, added = await registry.add_folder_rule(org, box.email, "Beta", f"account:{beta.id}")
    assert added       # tracked with its rule: read from its start
    await server.append(box.email, box.password, message("new", sender="buyer@stranger.example",
                                                         message_id="<new-1@stranger.example>"), folder="Projects")
    await pipeline(settings)

    for name in ("kept-1", "kept-2", "moved-in-1", "new-1"):
        assert await regarding(pool, org, f"{name}@stranger.example") == ("account", acme.id), name
    assert await regarding(pool, org, "moved-new-1@stranger.example") == ("account", beta.id)
    for name in ("gone-1", "flagged-1", "moved-out-1", "inbox-1"):
        assert await regarding(pool, org, f"{name}@stranger.example") is None, name
    assert [(d.tracked, d.reason) for d in await registry.decisions(org, "kept-1@stranger.example")] == \
        [(True, "tracked_folder_rule")]
    # Each message once: the onboarding announces what was read from the folder before, the sync
    # what came (or was moved) into it since, and a folder new to ingest needs no onboarding.
    events = await read_topic(settings, "email.received", 8 + 5)
    assert sorted((e["data"]["message_id"], e["data"]["folder"], e["data"]["refiled"]) for e in events[8:]) == [
        ("kept-1@stranger.example", "Projects", True), ("kept-2@stranger.example", "Projects", True),
        ("moved-in-1@stranger.example", "Projects", True), ("moved-new-1@stranger.example", "Beta", True),
        ("new-1@stranger.example", "Projects", False)]
    # The onboarding's events carry the server's arrival time, as the first announcements did.
    first = {e["data"]["message_id"]: e["data"]["received_at"] for e in before}
    assert all(e["data"]["received_at"] == first[e["data"]["message_id"]] for e in events[8:] if e["data"]["refiled"])
    assert len(await read_topic(settings, "activity.created", 5)) == 5

    # Once per rule: nothing is announced again at the next sync, nor after more mail arrives.
    await pipeline(settings)
    await server.append(box.email, box.password, message("later", sender="buyer@stranger.example",
                                                         message_id="<later-1@stranger.example>"), folder="Projects")
    await pipeline(settings)
    events = await read_topic(settings, "email.received", 8 + 5 + 1)
    assert [(e["data"]["message_id"], e["data"]["refiled"]) for e in events[13:]] == [("later-1@stranger.example", False)]
    assert await regarding(pool, org, "later-1@stranger.example") == ("account", acme.id)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM folder_tracking_rule WHERE mailbox_id = $1 "
                                   "AND onboarded_at IS NOT NULL", box.id) == 2
