"""A mailbox deactivated while its first, long sync runs stops within a couple of seconds: the batch
in flight is stored, published and saved, the session ends (LOGOUT, QUIT), the lease is released.
Reactivated, it resumes where it stopped, and every message is ingested exactly once.  The same for
the service stopping (SIGTERM) in the middle of a sync.

Ingest runs for real, as a long-lived service with a short refresh, against Dovecot; a few thousand
messages take several seconds to sync, so the deactivation lands in the middle of it.
"""
from __future__ import annotations

import time
import uuid
from collections import Counter

import asyncpg
import pytest

from shared.registry.service import Registry
from tests.support.inbound import ingest_running
from tests.support.mailboxes import imap_profile, message, pop3_profile, ready_mailbox
from tests.support.topics import read_topic
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers

# Small messages sync at several thousand a second here: enough of them that the whole sync takes
# several times what seeing the edit and finishing the batches in flight take.
MESSAGES = 20000
STARTED = 300   # some hundreds ingested before the edit
PROFILES = {"imap": imap_profile, "pop3": pop3_profile}


async def ingested(pool: asyncpg.Pool, mailbox_id: uuid.UUID) -> int:
    async with pool.acquire() as conn:
        return await conn.fetchval("SELECT count(*) FROM ingested_message WHERE mailbox_id = $1", mailbox_id)


async def leased(pool: asyncpg.Pool, mailbox_id: uuid.UUID) -> bool:
    async with pool.acquire() as conn:
        return await conn.fetchval("SELECT count(*) FROM mailbox_lease WHERE mailbox_id = $1", mailbox_id) > 0


async def filled_mailbox(registry: Registry, org, dovecot, protocol: str):
    await registry.add_profile(org, PROFILES[protocol](dovecot), make_default=True)
    box = await ready_mailbox(registry, org, dovecot)
    ids = [f"mid-{i}-{uuid.uuid4().hex[:8]}@customer.example" for i in range(MESSAGES)]
    dovecot.deliver_many(box.email, (message(f"m{i}", message_id=f"<{m}>", to=box.email)
                                     for i, m in enumerate(ids)))
    return box, ids


def session_ends(dovecot, protocol: str, address: str) -> list[str]:
    """How the mailbox's sessions ended so far, as Dovecot's log says: "Logged out" after LOGOUT or
    QUIT, "Disconnected: ..." for a connection closed without them."""
    text = dovecot.log_path.read_text(errors="replace")
    return [line.split(": Info: ", 1)[-1] for line in text.splitlines()
            if f"{protocol}({address.lower()})" in line and ("Logged out" in line or "Disconnected" in line)]


async def at_least(pool: asyncpg.Pool, mailbox_id: uuid.UUID, n: int) -> int:
    count = await ingested(pool, mailbox_id)
    return count if count >= n else 0


async def exactly_once(settings, pool: asyncpg.Pool, box, ids: list[str]) -> None:
    """Every message ingested once: one ingested_message row and one email.received event each."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT message_key FROM ingested_message WHERE mailbox_id = $1", box.id)
    assert Counter(r["message_key"] for r in rows) == Counter(ids)
    events = await read_topic(settings, "email.received", len(ids))
    by_id = Counter(e["data"]["message_id"] for e in events)
    assert sorted(by_id.values()) == [1] * len(ids), [m for m, n in by_id.items() if n > 1][:5]
    assert set(by_id) == set(ids)


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_a_mailbox_deactivated_mid_sync_stops_and_resumes_exactly(
        settings, registry: Registry, org, dovecot, pool: asyncpg.Pool, protocol: str) -> None:
    box, ids = await filled_mailbox(registry, org, dovecot, protocol)
    async with ingest_running(settings, refresh_seconds=0.1) as ingest:
        await eventually(lambda: at_least(pool, box.id, STARTED), timeout=60, interval=0.01, what="the sync under way")
        await registry.update_mailbox(org, box.email, active=False)
        at_edit = await ingested(pool, box.id)
        edited = time.monotonic()
        # The runner has stopped once its lease is released (kept until then).
        await eventually(lambda: _not(leased(pool, box.id)), timeout=5, interval=0.01, what="the lease released")
        took = time.monotonic() - edited
        stopped = await ingested(pool, box.id)
        assert box.id not in ingest.runners
        print(f"{protocol}: deactivated at {at_edit}, stopped at {stopped} of {MESSAGES}, {took:.2f} s after the edit")
        assert took < 3 and stopped <= MESSAGES // 2
        # One session, ended with LOGOUT or QUIT, and no failure recorded.
        ends = await eventually(lambda: _async(session_ends(dovecot, protocol, box.email)), timeout=5,
                                what="the session's end in Dovecot's log")
        assert len(ends) == 1 and "Logged out" in ends[0], ends
        mailbox = await registry.mailbox(org, box.email, sync=True)
        assert mailbox.incoming.error_count == 0 and not [a for a in mailbox.alerts if a.severity != "information"]
        if protocol == "imap":
            # Saved exactly as far as what was ingested: the next session goes on from there.
            assert [(f.folder, f.last_uid) for f in mailbox.sync.folders] == [("INBOX", stopped)]
        assert dovecot.message_count(box.email) == MESSAGES
        await registry.update_mailbox(org, box.email, active=True)
        await eventually(lambda: at_least(pool, box.id, MESSAGES), timeout=120, interval=0.1, what="all ingested")
    await exactly_once(settings, pool, box, ids)


async def test_ingest_stopped_mid_sync_stops_promptly_and_resumes_exactly(
        settings, registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    box, ids = await filled_mailbox(registry, org, dovecot, "imap")
    async with ingest_running(settings, refresh_seconds=0.1):
        await eventually(lambda: at_least(pool, box.id, STARTED), timeout=60, interval=0.01, what="the sync under way")
        at_stop = await ingested(pool, box.id)
        stopping = time.monotonic()
    # Leaving the block set the service's stopping event (as SIGTERM does) and waited for it to end.
    took = time.monotonic() - stopping
    stopped = await ingested(pool, box.id)
    print(f"stopped at {stopped} of {MESSAGES} ({at_stop} when asked), {took:.2f} s after")
    assert took < 3 and stopped <= MESSAGES // 2
    assert not await leased(pool, box.id)
    async with ingest_running(settings, refresh_seconds=0.1):
        await eventually(lambda: at_least(pool, box.id, MESSAGES), timeout=120, interval=0.1, what="all ingested")
    await exactly_once(settings, pool, box, ids)


async def _not(check) -> bool:
    return not await check


async def _async(value):
    return value
