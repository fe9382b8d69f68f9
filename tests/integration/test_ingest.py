"""Ingest against a real Dovecot: what reaches raw storage and `email.received`, resuming, UIDVALIDITY,
failures and back-off, POP3, and mailboxes that must not be touched."""
from __future__ import annotations

import asyncio
import imaplib
import uuid

import asyncpg
import pytest
from pydantic import SecretStr

from services.ingest.imap_client import ImapClient
from services.ingest.service import IngestService
from shared.lifecycle import run_service
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.mailboxes import imap_profile, message, pop3_profile, ready_mailbox
from tests.support.topics import read_topic

pytestmark = pytest.mark.peers


async def ingest_once(settings: Settings) -> None:
    await run_service(IngestService(settings), burst=True)


async def received(settings: Settings, expected: int, timeout: float = 15.0) -> list[dict]:
    """All `email.received` events of this test's topic, waiting until there are ``expected``."""
    return await read_topic(settings, "email.received", expected, timeout)


async def test_imap_messages_are_stored_then_published_once(settings, registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot)
    raws = [message(f"m{i}") for i in range(30)]
    dovecot.deliver_many(box.email, raws)
    await ingest_once(settings)
    events = await received(settings, 30)
    assert len(events) == 30
    async with pool.acquire() as conn:
        stored = await conn.fetch("SELECT data FROM raw_message WHERE sha256 = ANY($1::text[])",
                                  [e["data"]["raw_sha256"] for e in events])
    assert sorted(bytes(r["data"]) for r in stored) == sorted(raws)
    assert {e["data"]["mailbox_id"] for e in events} == {str(box.id)}
    # A second pass resumes from the stored state: nothing new, nothing again.
    dovecot.deliver(box.email, message("late"))
    await ingest_once(settings)
    events = await received(settings, 31)
    assert len(events) == 31 and events[-1]["data"]["uid"] == 31
    # `conduit mailbox show` says where ingest stands: the folder read to UID 31, 31 messages in.
    sync = (await registry.mailbox(org, box.email, sync=True)).sync
    assert sync is not None and sync.ingested == 31 and sync.last_ingested_at is not None
    assert [(f.folder, f.last_uid) for f in sync.folders] == [("INBOX", 31)] and sync.folders[0].highestmodseq
    assert sync.worked_by is None, "a burst run gives its leases back"


async def test_uidvalidity_change_resyncs_without_duplicates(settings, registry: Registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver_many(box.email, [message(f"m{i}") for i in range(5)])
    await ingest_once(settings)
    async with pool.acquire() as conn:  # as if the server had rebuilt the folder
        await conn.execute("UPDATE imap_folder_state SET uidvalidity = uidvalidity + 1 WHERE mailbox_id = $1", box.id)
    dovecot.deliver(box.email, message("after"))
    await ingest_once(settings)
    events = await received(settings, 6)
    assert len(events) == 6
    assert len({e["data"]["message_id"] for e in events}) == 6


async def test_a_mailbox_pointed_at_another_account_reads_it_from_its_start(
        settings, registry: Registry, org, dovecot, pool) -> None:
    """The saved folder state belongs to the account it was read from.  Pointed at another account
    (new credentials; a profile's host edited is the same case) whose INBOX has the same UIDVALIDITY
    (Dovecot numbers a folder by its creation time: two created in one second share it), the old
    state would skip the new account's first messages for ever."""
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver_many(box.email, [message(f"old{i}") for i in range(3)])
    await ingest_once(settings)
    other, password = f"other-{uuid.uuid4().hex[:8]}@example.com", "pw-other"
    dovecot.add_user(other, password)
    new = [f"<new{i}-{uuid.uuid4().hex}@customer.example>" for i in range(5)]
    dovecot.deliver_many(other, [message(f"new{i}", message_id=m) for i, m in enumerate(new)])
    client = await ImapClient.connect(dovecot.host, dovecot.imap_port, tls="none", ssl_context=None)
    await client.login(other, password)
    uidvalidity = (await client.select("INBOX")).uidvalidity
    await client.logout()
    async with pool.acquire() as conn:   # the coincidence, made certain
        await conn.execute("UPDATE imap_folder_state SET uidvalidity = $2 WHERE mailbox_id = $1", box.id, uidvalidity)
    await registry.set_credentials(org, box.email, other, SecretStr(password))
    await ingest_once(settings)
    events = await received(settings, 8)
    assert sorted(e["data"]["message_id"] for e in events[3:]) == sorted(m.strip("<>") for m in new)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT last_uid FROM imap_folder_state WHERE mailbox_id = $1", box.id) == 5


async def test_message_moved_between_tracked_folders_is_not_ingested_twice(settings, registry: Registry, org, dovecot) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, tracked_folders=["INBOX", "Projects", "Missing"])
    raw = message("moving")
    dovecot.deliver(box.email, raw)
    dovecot.deliver(box.email, message("first in projects"), folder="Projects")
    await ingest_once(settings)
    dovecot.deliver(box.email, raw, folder="Projects")  # the same message now in another tracked folder
    dovecot.deliver(box.email, message("only in projects"), folder="Projects")
    await ingest_once(settings)
    events = await received(settings, 3)
    assert sorted(e["data"]["folder"] for e in events) == ["INBOX", "Projects", "Projects"]
    mailbox = await registry.mailbox(org, box.email)
    assert mailbox.incoming.error_count == 0
    assert [a.code for a in mailbox.alerts] == ["folder_missing"]  # once, not at every pass


async def test_a_missing_folder_is_said_once_across_sessions(settings, registry: Registry, org, dovecot, pool,
                                                             publisher) -> None:
    """Sessions of one ingest process (a reconnect, a profile edit) with other alerts in between: one
    ``folder_missing``; again only once the folder was found in between."""
    from services.ingest.runner import MailboxRunner, RunnerContext, ServerSlots
    from shared.crypto import load_cipher
    from shared.oauth import TokenProvider

    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, tracked_folders=["INBOX", "Later"])
    work = (await Registry(pool, load_cipher(settings)).mailboxes_to_process("incoming", mailbox_ids=[box.id]))[0]
    ctx = RunnerContext(pool, publisher, registry, ServerSlots(), TokenProvider())

    async def session_with_an_alert_before() -> list[str]:
        await registry.raise_alert(box.id, "information", "incoming", "other", f"another alert {uuid.uuid4()}")
        assert await MailboxRunner(ctx, work, idle_allowed=False).sync_once() is True
        return [a.code for a in (await registry.mailbox(org, box.email)).alerts if a.code != "other"]

    assert await session_with_an_alert_before() == ["folder_missing"]
    assert await session_with_an_alert_before() == ["folder_missing"]   # not again
    dovecot.deliver(box.email, message("now it exists"), folder="Later")
    assert await session_with_an_alert_before() == ["folder_missing"]

    def delete_later() -> None:
        with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=30) as imap:
            imap.login(box.email, box.password)
            assert imap.delete("Later")[0] == "OK"
            imap.logout()

    await asyncio.to_thread(delete_later)
    assert await session_with_an_alert_before() == ["folder_missing", "folder_missing"]   # gone again: said again


async def test_pop3_uidl_bookkeeping(settings, registry: Registry, org, dovecot) -> None:
    await registry.add_profile(org, pop3_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver_many(box.email, [message(f"p{i}") for i in range(4)])
    await ingest_once(settings)
    dovecot.deliver(box.email, message("p-late"))
    await ingest_once(settings)
    events = await received(settings, 5)
    assert len(events) == 5 and all(e["data"]["source"] == "pop3" and e["data"]["uidl"] for e in events)
    sync = (await registry.mailbox(org, box.email, sync=True)).sync
    assert sync is not None and (sync.pop3_seen, sync.ingested, sync.folders) == (5, 5, [])


@pytest.mark.parametrize("change", ["inactive", "no_profile", "not_approved"])
async def test_excluded_mailboxes_are_untouched(settings, registry: Registry, org, dovecot, pool, change: str) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver(box.email, message("never read"))
    column = {"inactive": "active = false", "no_profile": "profile_id = NULL", "not_approved": "email_approved = false"}[change]
    async with pool.acquire() as conn:
        await conn.execute(f"UPDATE mailbox SET {column} WHERE id = $1", box.id)
    await ingest_once(settings)
    assert await received(settings, 0, timeout=1.5) == []
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM imap_folder_state WHERE mailbox_id = $1", box.id) == 0


async def test_wrong_password_alerts_backs_off_and_recovers(settings, registry: Registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver(box.email, message("waiting"))
    dovecot.set_password(box.email, "changed-on-the-server")
    await ingest_once(settings)
    mailbox = await registry.mailbox(org, box.email)
    assert mailbox.incoming.error_count == 1 and mailbox.incoming.backoff_until is not None
    assert mailbox.alerts[0].code == "authentication_failed"
    assert "changed-on-the-server" not in mailbox.alerts[0].message and box.password not in mailbox.alerts[0].message
    await ingest_once(settings)  # backing off: not even tried
    assert (await registry.mailbox(org, box.email)).incoming.error_count == 1
    # The server is fixed and the back-off ends: the mailbox recovers by itself.
    dovecot.set_password(box.email, box.password)
    async with pool.acquire() as conn:
        await conn.execute("UPDATE mailbox SET incoming_backoff_until = now() WHERE id = $1", box.id)
    await ingest_once(settings)
    mailbox = await registry.mailbox(org, box.email)
    assert mailbox.incoming.error_count == 0 and mailbox.alerts[0].code == "recovered"
    assert len(await received(settings, 1)) == 1


async def test_refused_connection_backs_off_one_mailbox_only(settings, registry: Registry, org, dovecot) -> None:
    from conduit.peers.ports import free_port

    await registry.add_profile(org, imap_profile(dovecot))
    await registry.add_profile(org, imap_profile(dovecot, name="dead", incoming_port=free_port()))
    good = await ready_mailbox(registry, org, dovecot)
    bad = await ready_mailbox(registry, org, dovecot, profile="dead")
    dovecot.deliver(good.email, message("fine"))
    await ingest_once(settings)
    assert len(await received(settings, 1)) == 1
    bad_state = await registry.mailbox(org, bad.email)
    assert bad_state.incoming.error_count == 1 and bad_state.alerts[0].code == "connection_failed"


async def test_a_broker_failure_is_not_the_mailboxs_fault(settings, registry: Registry, org, dovecot, pool) -> None:
    """The broker refuses to take the events: the session ends without an alert or back-off for the
    mailbox (it is not the mail server's fault), nothing counts as ingested, and once the broker
    takes them again the same messages are published, once."""
    from services.ingest.runner import MailboxRunner, RunnerContext, ServerSlots
    from shared.crypto import load_cipher
    from shared.kafka import Publisher
    from shared.oauth import TokenProvider

    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver_many(box.email, [message(f"b{i}") for i in range(3)])
    closed = Publisher(settings, client_id="closed")
    await closed.start()
    await closed.producer.stop()   # a producer that can no longer publish: aiokafka raises a KafkaError
    work = (await Registry(pool, load_cipher(settings)).mailboxes_to_process("incoming", mailbox_ids=[box.id]))[0]
    runner = MailboxRunner(RunnerContext(pool, closed, registry, ServerSlots(), TokenProvider()), work, idle_allowed=False)
    assert await runner.sync_once() is True, "not a mailbox failure"
    state = await registry.mailbox(org, box.email, sync=True)
    assert state.incoming.error_count == 0 and state.incoming.backoff_until is None and not state.alerts
    assert state.sync.ingested == 0

    await ingest_once(settings)
    assert len(await received(settings, 3)) == 3


async def test_mail_received_before_the_profiles_date_is_skipped_for_good(settings, registry: Registry, org, dovecot) -> None:
    """"Process email received after": a message the server received earlier (its INTERNALDATE, which
    Dovecot takes from the maildir file's time) is not ingested, now or at the next sync."""
    import os
    from datetime import datetime, timezone

    await registry.add_profile(org, imap_profile(dovecot, process_email_received_after=datetime(2026, 1, 1, tzinfo=timezone.utc)))
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver_many(box.email, [message("received in 2025"), message("received today")])
    (older, _) = sorted((dovecot.maildir(box.email) / "new").iterdir())
    received_2025 = datetime(2025, 6, 1, tzinfo=timezone.utc).timestamp()
    os.utime(older, (received_2025, received_2025))
    await ingest_once(settings)
    await ingest_once(settings)
    events = await received(settings, 1)
    assert [e["data"]["uid"] for e in events] == [2], "only the message received after the profile's date"
    sync = (await registry.mailbox(org, box.email, sync=True)).sync
    assert [(f.folder, f.last_uid) for f in sync.folders] == [("INBOX", 2)], "the older one is passed, not waited for"
