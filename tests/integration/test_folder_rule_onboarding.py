"""The onboarding of a folder-level tracking rule, at ingest's level against a real Dovecot: a batch
at a time (one UID FETCH of flags and arrival times each, no content), resumed after a broken
session where it stopped, and for a folder renumbered before it, by the resync itself."""
from __future__ import annotations

import asyncio
import imaplib

import pytest

from services.ingest import imap_sync
from services.ingest.imap_client import ImapClient
from services.ingest.imap_sync import ImapFolderSync
from services.ingest.publishing import Mailbox
from shared.errors import ConnectionFailed
from tests.support.mailboxes import message, ready_mailbox
from tests.support.relay import CLOSE, line_relay
from tests.support.topics import read_topic

pytestmark = pytest.mark.peers

ONBOARDING_FETCH = b"(UID FLAGS INTERNALDATE)"


async def session(host: str, port: int, box) -> ImapClient:
    client = await ImapClient.connect(host, port, tls="none", timeout=10)
    await client.login(box.email, box.password)
    return client


def other_client(dovecot, box, action) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=30) as imap:
        imap.login(box.email, box.password)
        action(imap)
        imap.logout()


async def refiled(settings, expected: int) -> list[str]:
    """Message-IDs of the refiled `email.received` events, in order."""
    events = await read_topic(settings, "email.received", expected)
    return [e["data"]["message_id"] for e in events if e["data"]["refiled"]]


async def rule_progress(pool, box, folder: str) -> tuple[int | None, bool]:
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT onboarded_uid, onboarded_at IS NOT NULL AS done FROM folder_tracking_rule "
                                  "WHERE mailbox_id = $1 AND folder = $2", box.id, folder)
    return row["onboarded_uid"], row["done"]


async def test_onboarding_goes_a_batch_at_a_time_and_resumes_where_a_broken_session_stopped(
        settings, registry, org, dovecot, pool, publisher, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imap_sync, "BATCH", 4)
    box = await ready_mailbox(registry, org, dovecot, tracked_folders=["INBOX", "Projects"])
    acme = await registry.add_record(org, "account", "Acme", f"info@{org.name}.example")
    dovecot.deliver_many(box.email, [message(f"m{i}", message_id=f"<onb-{i}@x.example>") for i in range(1, 13)],
                         folder="Projects")
    sync = ImapFolderSync(pool, publisher, Mailbox(box.id, org.id, False))
    client = await session(dovecot.host, dovecot.imap_port, box)
    try:
        assert await sync.sync(client, ["Projects"]) == 12
    finally:
        await client.logout()

    def expunge_2_and_7(imap: imaplib.IMAP4) -> None:
        assert imap.select("Projects")[0] == "OK"
        assert imap.uid("STORE", "2,7", "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
        assert imap.expunge()[0] == "OK"

    await asyncio.to_thread(other_client, dovecot, box, expunge_2_and_7)
    await registry.add_folder_rule(org, box.email, "Projects", f"account:{acme.id}")

    # The session breaks as ingest asks about the onboarding's second batch.
    asked: list[bytes] = []

    def cut_at_second_batch(line: bytes) -> bytes | None:
        if ONBOARDING_FETCH in line:
            asked.append(line)
            if len(asked) == 2:
                return CLOSE
        return None

    relay, port = await line_relay(dovecot.host, dovecot.imap_port, cut_at_second_batch)
    try:
        broken = await session("127.0.0.1", port, box)
        with pytest.raises(ConnectionFailed):
            await sync.sync(broken, ["Projects"])
        await broken.close()
    finally:
        relay.close()
    assert b"UID FETCH 1:4 " + ONBOARDING_FETCH in asked[0]
    assert await refiled(settings, 12 + 3) == ["onb-1@x.example", "onb-3@x.example", "onb-4@x.example"]
    assert await rule_progress(pool, box, "Projects") == (4, False)
    assert [r.earlier_mail() for r in await registry.folder_rules(org, box.email)] == ["being filed (up to UID 4)"]

    # The next session goes on after the first batch: each message still there once, none twice.
    seen: list[bytes] = []
    relay, port = await line_relay(dovecot.host, dovecot.imap_port, lambda line: seen.append(line))
    try:
        resumed = await session("127.0.0.1", port, box)
        assert await sync.sync(resumed, ["Projects"]) == 0
        await resumed.logout()
    finally:
        relay.close()
    onboarding = [line for line in seen if ONBOARDING_FETCH in line]
    assert [line.split(b" ")[3] for line in onboarding] == [b"5:8", b"9:12"]   # 4 UIDs a command
    assert not [line for line in seen if b"BODY" in line], "no content is fetched again"
    assert await refiled(settings, 12 + 10) == [f"onb-{i}@x.example" for i in (1, 3, 4, 5, 6, 8, 9, 10, 11, 12)]
    assert await rule_progress(pool, box, "Projects") == (12, True)
    assert [r.earlier_mail() for r in await registry.folder_rules(org, box.email)] == ["filed"]

    again = await session(dovecot.host, dovecot.imap_port, box)
    try:
        assert await sync.sync(again, ["Projects"]) == 0
    finally:
        await again.logout()
    assert len(await refiled(settings, 12 + 10)) == 10


async def test_a_folder_renumbered_before_its_rule_is_onboarded_files_its_mail_once(
        settings, registry, org, dovecot, pool, publisher) -> None:
    """The server renumbers the folder (rebuilt by another client) before the rule's first sync: the
    folder is read again from its start, and the messages found again in it that ingest had read
    from it before are announced again (refiled) as they are found, once; one gone is not."""
    box = await ready_mailbox(registry, org, dovecot, tracked_folders=["INBOX", "Archive"])
    acme = await registry.add_record(org, "account", "Acme", f"info@{org.name}.example")
    raws = [message(f"a{i}", message_id=f"<ren-{i}@x.example>") for i in range(1, 4)]
    for raw in raws:
        await dovecot.append(box.email, box.password, raw, folder="Archive")
    sync = ImapFolderSync(pool, publisher, Mailbox(box.id, org.id, False))
    client = await session(dovecot.host, dovecot.imap_port, box)
    try:
        assert await sync.sync(client, ["Archive"]) == 3
        await asyncio.to_thread(other_client, dovecot, box, lambda imap: imap.delete('"Archive"'))
        for raw in [raws[0], raws[2], message("new", message_id="<ren-new@x.example>")]:
            await dovecot.append(box.email, box.password, raw, folder="Archive")
        await registry.add_folder_rule(org, box.email, "Archive", f"account:{acme.id}")

        assert await sync.sync(client, ["Archive"]) == 1
        events = await read_topic(settings, "email.received", 3 + 3)
        assert sorted((e["data"]["message_id"], e["data"]["refiled"]) for e in events[3:]) == [
            ("ren-1@x.example", True), ("ren-3@x.example", True), ("ren-new@x.example", False)]
        assert (await rule_progress(pool, box, "Archive"))[1]

        assert await sync.sync(client, ["Archive"]) == 0
        assert len(await read_topic(settings, "email.received", 6)) == 6
    finally:
        await client.logout()


async def renumbered_under_a_new_rule(registry, org, dovecot, pool, publisher, prefix: str,
                                     count: int) -> tuple[object, ImapFolderSync, int]:
    """``count`` messages read from Archive, the folder then rebuilt by another client (renumbered,
    the same messages in it) and given a rule: (the mailbox, its sync, the new UIDVALIDITY)."""
    box = await ready_mailbox(registry, org, dovecot, tracked_folders=["INBOX", "Archive"])
    acme = await registry.add_record(org, "account", "Acme", f"info@{org.name}.example")
    raws = [message(f"{prefix}{i}", message_id=f"<{prefix}-{i}@x.example>") for i in range(1, count + 1)]
    for raw in raws:
        await dovecot.append(box.email, box.password, raw, folder="Archive")
    sync = ImapFolderSync(pool, publisher, Mailbox(box.id, org.id, False))
    client = await session(dovecot.host, dovecot.imap_port, box)
    try:
        assert await sync.sync(client, ["Archive"]) == count
        await asyncio.to_thread(other_client, dovecot, box, lambda imap: imap.delete('"Archive"'))
        for raw in raws:
            await dovecot.append(box.email, box.password, raw, folder="Archive")
        await registry.add_folder_rule(org, box.email, "Archive", f"account:{acme.id}")
        renumbered = (await client.select("Archive")).uidvalidity
    finally:
        await client.logout()
    return box, sync, renumbered


async def left_by_a_resync_cut_after_its_first_batch(pool, box, renumbered: int, first_key: str) -> None:
    """What a resync cut after its first batch leaves: that batch (UID 1) recorded under the new
    numbering, with the rule's progress."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE imap_folder_state SET uidvalidity = $2, last_uid = 1, highestmodseq = NULL "
                           "WHERE mailbox_id = $1 AND folder = 'Archive'", box.id, renumbered)
        await conn.execute("UPDATE ingested_message SET uidvalidity = $2, uid = 1 "
                           "WHERE mailbox_id = $1 AND message_key = $3", box.id, renumbered, first_key)
        await conn.execute("UPDATE folder_tracking_rule SET onboarded_uidvalidity = $2, onboarded_uid = 1 "
                           "WHERE mailbox_id = $1 AND folder = 'Archive'", box.id, renumbered)


async def test_a_resync_killed_after_a_batch_files_the_rest_of_the_folders_mail_from_before(
        settings, registry, org, dovecot, pool, publisher) -> None:
    """The renumbered folder's resync was killed after its first batch was saved (progress and all),
    before the next batch's events went out: the next sync, no longer a resync, still announces again
    the messages it finds that were read from the folder under the earlier numbering."""
    box, sync, renumbered = await renumbered_under_a_new_rule(registry, org, dovecot, pool, publisher, "kill", 3)
    await left_by_a_resync_cut_after_its_first_batch(pool, box, renumbered, "kill-1@x.example")
    client = await session(dovecot.host, dovecot.imap_port, box)
    try:
        assert await sync.sync(client, ["Archive"]) == 0
        assert await refiled(settings, 3 + 2) == ["kill-2@x.example", "kill-3@x.example"]
        assert await rule_progress(pool, box, "Archive") == (3, True)   # it went on with the read, to its end
        assert await sync.sync(client, ["Archive"]) == 0
        assert len(await read_topic(settings, "email.received", 5)) == 5
    finally:
        await client.logout()


async def test_a_renumbered_folders_read_cut_short_twice_still_files_all_its_earlier_mail(
        settings, registry, org, dovecot, pool, publisher, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resync of a renumbered folder was cut after its first batch, then the next sync after its
    own first batch: the rule's onboarding must go on with the read of the folder, not end when the
    server is asked about what the state already covers (it used to, so the third sync refiled nothing)."""
    monkeypatch.setattr(imap_sync, "BATCH", 1)
    box, sync, renumbered = await renumbered_under_a_new_rule(registry, org, dovecot, pool, publisher, "twice", 4)
    await left_by_a_resync_cut_after_its_first_batch(pool, box, renumbered, "twice-1@x.example")
    fetches = []

    def cut_at_third_content_fetch(line: bytes) -> bytes | None:
        if b"UID FETCH" in line and b"BODY.PEEK[]" in line:
            fetches.append(line)
            if len(fetches) == 3:
                return CLOSE
        return None

    relay, port = await line_relay(dovecot.host, dovecot.imap_port, cut_at_third_content_fetch)
    try:
        cut = await session("127.0.0.1", port, box)
        with pytest.raises(ConnectionFailed):
            await sync.sync(cut, ["Archive"])
        await cut.close()
    finally:
        relay.close()
    assert (await rule_progress(pool, box, "Archive"))[1] is False

    client = await session(dovecot.host, dovecot.imap_port, box)
    try:
        await sync.sync(client, ["Archive"])
    finally:
        await client.logout()
    assert set(await refiled(settings, 4 + 3)) == {"twice-2@x.example", "twice-3@x.example", "twice-4@x.example"}
    assert (await rule_progress(pool, box, "Archive"))[1] is True


async def test_a_refused_onboarding_does_not_hold_back_the_folders_new_mail(
        settings, registry, org, dovecot, pool, publisher) -> None:
    box = await ready_mailbox(registry, org, dovecot, tracked_folders=["INBOX", "Projects"])
    acme = await registry.add_record(org, "account", "Acme", f"info@{org.name}.example")
    await dovecot.append(box.email, box.password, message("old", message_id="<old@x.example>"), folder="Projects")
    sync = ImapFolderSync(pool, publisher, Mailbox(box.id, org.id, False))
    client = await session(dovecot.host, dovecot.imap_port, box)
    try:
        assert await sync.sync(client, ["Projects"]) == 1
    finally:
        await client.logout()
    await registry.add_folder_rule(org, box.email, "Projects", f"account:{acme.id}")
    await dovecot.append(box.email, box.password, message("new", message_id="<new@x.example>"), folder="Projects")

    def refuse(line: bytes) -> bytes | None:
        if ONBOARDING_FETCH in line:   # as Gmail refuses some UID FETCHes
            return line.split(b" ")[0] + b" NO [SERVERBUG] Some messages could not be FETCHed (Failure)\r\n"
        return None

    relay, port = await line_relay(dovecot.host, dovecot.imap_port, refuse)
    try:
        refusing = await session("127.0.0.1", port, box)
        try:
            assert await sync.sync(refusing, ["Projects"]) == 1   # the new message: it used to wait for ever
        finally:
            await refusing.logout()
    finally:
        relay.close()
    assert any("could not file its earlier mail yet" in text for _, text in sync.warnings), sync.warnings
    assert (await rule_progress(pool, box, "Projects"))[1] is False
    client = await session(dovecot.host, dovecot.imap_port, box)
    try:
        assert await sync.sync(client, ["Projects"]) == 0
    finally:
        await client.logout()
    # The new message, read while the onboarding waited, may be announced again with it: the same
    # rule files it under the same record, which changes nothing.
    assert "old@x.example" in await refiled(settings, 3)
    assert (await rule_progress(pool, box, "Projects"))[1] is True
