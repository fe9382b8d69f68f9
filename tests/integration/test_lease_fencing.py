"""A session that outlived its mailbox's lease records nothing more: what it would store, publish,
save or count is fenced by the lease (``services.ingest.leases.hold``), so the replica that took the
mailbox over is the only one whose progress counts."""
from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from services.evaluate.service import EvaluateService
from services.ingest.imap_client import ImapClient
from services.ingest.imap_sync import ImapFolderSync
from services.ingest.leases import LeaseLost, Leases
from services.ingest.pop3_client import Pop3Client
from services.ingest.pop3_sync import Pop3Sync
from services.ingest.publishing import Mailbox
from services.ingest.runner import MailboxRunner, RunnerContext, ServerSlots
from services.ingest.service import IngestService, IngestSettings
from shared.events.topics import EMAIL_RECEIVED
from shared.crypto import load_cipher
from shared.kafka import Publisher
from shared.lifecycle import run_service
from shared.oauth import TokenProvider
from shared.registry.service import Registry
from tests.support.mailboxes import ReadyMailbox, imap_profile, message, pop3_profile, ready_mailbox
from tests.support.topics import read_topic
from tests.support.waiting import eventually


async def _taken_over(pool: asyncpg.Pool, mailbox_id: uuid.UUID) -> tuple[Leases, Leases]:
    """(the replica that held the mailbox, the one that took it over)."""
    stale = Leases(pool, f"stale-{uuid.uuid4().hex[:6]}")
    assert (await stale.claim([mailbox_id], fair_share=False)).work == {mailbox_id}
    return stale, await _take_over(pool, stale, mailbox_id)


async def _take_over(pool: asyncpg.Pool, stale: Leases, mailbox_id: uuid.UUID) -> Leases:
    """The stale replica's lease runs out and another replica claims the mailbox."""
    async with pool.acquire() as conn:
        await conn.execute("UPDATE mailbox_lease SET expires_at = now() - interval '1 second' WHERE holder = $1",
                           stale.holder)
        await conn.execute("UPDATE ingest_replica SET expires_at = now() - interval '1 second' WHERE holder = $1",
                           stale.holder)
    other = Leases(pool, f"other-{uuid.uuid4().hex[:6]}")
    assert (await other.claim([mailbox_id], fair_share=False)).work == {mailbox_id}
    return other


async def _recorded(pool: asyncpg.Pool, mailbox_id: uuid.UUID) -> dict[str, int]:
    async with pool.acquire() as conn:
        return {table: await conn.fetchval(f"SELECT count(*) FROM {table} WHERE mailbox_id = $1", mailbox_id)
                for table in ("ingested_message", "imap_folder_state", "pop3_seen", "refused_message")}


async def _imap_session(box: ReadyMailbox, dovecot) -> ImapClient:
    client = await ImapClient.connect(dovecot.host, dovecot.imap_port, tls="none", timeout=10)
    await client.login(box.email, box.password)
    return client


class _TakenOverAfterPublishing(Publisher):
    """The broker acknowledges a batch's events, and then, before the batch's state is saved, the
    lease is taken over (the replica stalled for longer than its lease)."""

    take_over = None

    async def publish_many(self, events):
        await super().publish_many(events)
        if self.take_over is not None:
            await self.take_over()
            self.take_over = None


async def test_a_session_whose_lease_was_taken_over_stores_and_publishes_nothing(
        settings, registry, org, dovecot, pool: asyncpg.Pool, publisher) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver_many(box.email, [message(f"m{i}") for i in range(3)])
    stale, other = await _taken_over(pool, box.id)

    client = await _imap_session(box, dovecot)
    try:
        with pytest.raises(LeaseLost):
            await ImapFolderSync(pool, publisher, Mailbox(box.id, org.id, False, stale.holder)).sync(client, ["INBOX"])
    finally:
        await client.logout()
    assert await read_topic(settings, EMAIL_RECEIVED.name, 0, timeout=3) == []
    assert await _recorded(pool, box.id) == {"ingested_message": 0, "imap_folder_state": 0, "pop3_seen": 0,
                                             "refused_message": 0}

    # The replica that holds the lease now ingests the mailbox, each message once.
    client = await _imap_session(box, dovecot)
    try:
        published = await ImapFolderSync(pool, publisher, Mailbox(box.id, org.id, False, other.holder)).sync(client, ["INBOX"])
    finally:
        await client.logout()
    assert published == 3
    assert len(await read_topic(settings, EMAIL_RECEIVED.name, 3)) == 3
    await other.release_all()


async def test_a_lease_taken_over_before_the_state_is_saved_saves_nothing(
        settings, registry, org, dovecot, pool: asyncpg.Pool) -> None:
    """The stale session's events went out (the window the fence cannot close: evaluate's keys make
    them harmless), but its folder state and its record of what it ingested are not written, so the
    replica that holds the lease now is the one whose progress counts."""
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver_many(box.email, [message(f"m{i}") for i in range(3)])
    stale = Leases(pool, f"stale-{uuid.uuid4().hex[:6]}")
    assert (await stale.claim([box.id], fair_share=False)).work == {box.id}
    taken: list[Leases] = []

    async def take_over() -> None:
        taken.append(await _take_over(pool, stale, box.id))

    publisher = _TakenOverAfterPublishing(settings, client_id="stale")
    publisher.take_over = take_over
    await publisher.start()
    client = await _imap_session(box, dovecot)
    try:
        with pytest.raises(LeaseLost):
            await ImapFolderSync(pool, publisher, Mailbox(box.id, org.id, False, stale.holder)).sync(client, ["INBOX"])
    finally:
        await client.logout()
        await publisher.stop()
    assert taken, "the lease was taken over while the batch was in flight"
    recorded = await _recorded(pool, box.id)
    assert recorded["ingested_message"] == 0 and recorded["imap_folder_state"] == 0
    await taken[0].release_all()


async def test_a_session_whose_lease_was_taken_over_removes_nothing_from_a_queue(
        settings, registry, org, dovecot, pool: asyncpg.Pool, publisher) -> None:
    """A queue that deletes after processing: the stale session removes no processed mail (the
    replica holding the lease now does), so it acts on no state the new holder may have changed."""
    await registry.add_profile(org, imap_profile(dovecot))
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", delete_after_processing=True)
    dovecot.deliver_many(queue.email, [message(f"q{i}") for i in range(2)])
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)     # both tracked: both may be removed
    stale, other = await _taken_over(pool, queue.id)

    for holder, removes in ((stale.holder, False), (other.holder, True)):
        client = await _imap_session(queue, dovecot)
        try:
            sync = ImapFolderSync(pool, publisher, Mailbox(queue.id, org.id, False, holder),
                                  delete_after_processing=True)
            if removes:
                assert await sync.remove_processed(client) == 2
            else:
                with pytest.raises(LeaseLost):
                    await sync.remove_processed(client)
        finally:
            await client.logout()
        assert dovecot.message_count(queue.email) == (0 if removes else 2)
    await other.release_all()


async def test_a_pop3_session_whose_lease_was_taken_over_publishes_and_marks_nothing(
        settings, registry, org, dovecot, pool: asyncpg.Pool, publisher) -> None:
    await registry.add_profile(org, pop3_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver_many(box.email, [message(f"p{i}") for i in range(2)])
    stale, other = await _taken_over(pool, box.id)

    client = await Pop3Client.connect(dovecot.host, dovecot.pop3_port, tls="none", ssl_context=None)
    await client.login(box.email, box.password)
    try:
        with pytest.raises(LeaseLost):
            await Pop3Sync(pool, publisher, Mailbox(box.id, org.id, False, stale.holder)).sync(client)
    finally:
        await client.quit()
    assert await read_topic(settings, EMAIL_RECEIVED.name, 0, timeout=3) == []
    assert (await _recorded(pool, box.id))["pop3_seen"] == 0
    await other.release_all()


async def test_a_runner_whose_lease_was_taken_over_stops_without_a_failure(
        settings, registry, org, dovecot, pool: asyncpg.Pool, publisher) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver(box.email, message("m"))
    stale, other = await _taken_over(pool, box.id)
    work = (await Registry(pool, load_cipher(settings)).mailboxes_to_process("incoming", mailbox_ids=[box.id]))[0]
    runner = MailboxRunner(RunnerContext(pool, publisher, registry, ServerSlots(), TokenProvider(),
                                         lease_holder=stale.holder), work, idle_allowed=False)
    assert await runner.sync_once() is False, "the session ends: the mailbox is another replica's now"
    state = await registry.mailbox(org, box.email, sync=True)
    assert state.incoming.error_count == 0 and state.incoming.backoff_until is None and not state.alerts
    assert state.sync.ingested == 0
    await other.release_all()


async def test_a_one_shot_run_renews_its_leases_while_its_sessions_last(settings, registry, org, dovecot,
                                                                       pool: asyncpg.Pool) -> None:
    """A first sync may outlast the lease's time to live: the run renews its leases meanwhile, so no
    replica takes the mailbox over (and the run's saves are not refused)."""
    opened = asyncio.Event()
    release = asyncio.Event()

    async def gate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Relays to Dovecot, holding the session until the test releases it."""
        opened.set()
        await release.wait()
        up_reader, up_writer = await asyncio.open_connection(dovecot.host, dovecot.imap_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    server = await asyncio.start_server(gate, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    await registry.add_profile(org, imap_profile(dovecot, incoming_host="127.0.0.1", incoming_port=port))
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver(box.email, message("m"))

    async def expires_at():
        async with pool.acquire() as conn:
            return await conn.fetchval("SELECT expires_at FROM mailbox_lease WHERE mailbox_id = $1", box.id)

    service = IngestService(settings, IngestSettings(lease_ttl_seconds=1.0, refresh_seconds=0.2))
    run = asyncio.create_task(run_service(service, burst=True))
    try:
        await asyncio.wait_for(opened.wait(), timeout=20)
        first = await expires_at()
        await eventually(lambda: _later(expires_at, first, by=1.0), what="the lease renewed past its first time to live")
        release.set()
        await asyncio.wait_for(run, timeout=30)
    finally:
        release.set()
        server.close()
    assert (await registry.mailbox(org, box.email, sync=True)).sync.ingested == 1


async def _later(current, first, *, by: float) -> bool:
    now = await current()
    return now is not None and (now - first).total_seconds() >= by
