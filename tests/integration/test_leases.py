"""Mailbox leases: one replica per mailbox, a dead replica's mailboxes are taken over, and a replica
that joins gets its fair share from one that holds everything (replica heartbeats)."""
from __future__ import annotations

import asyncio
import math
import time
import uuid

import asyncpg

from services.ingest.leases import Leases
from services.ingest.service import IngestService, IngestSettings
from shared.lifecycle import run_service
from shared.registry.service import Registry
from tests.support.mailboxes import imap_profile, ready_mailbox
from tests.support.waiting import eventually


async def _mailboxes(registry: Registry, org, dovecot, n: int) -> list[uuid.UUID]:
    await registry.add_profile(org, imap_profile(dovecot))
    ids = []
    for i in range(n):
        user = await registry.add_user(org, f"U{i}", f"lease-{uuid.uuid4().hex[:8]}@example.com")
        ids.append(user.mailbox_id)
    return ids


async def _expire(pool: asyncpg.Pool, holder: str) -> None:
    """The replica dies: its heartbeat and its leases run out."""
    async with pool.acquire() as conn:
        await conn.execute("UPDATE mailbox_lease SET expires_at = now() - interval '1 second' WHERE holder = $1", holder)
        await conn.execute("UPDATE ingest_replica SET expires_at = now() - interval '1 second' WHERE holder = $1", holder)


async def _holders(pool: asyncpg.Pool, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT mailbox_id, holder FROM mailbox_lease WHERE mailbox_id = ANY($1::uuid[])", ids)
    return {r["mailbox_id"]: r["holder"] for r in rows}


async def test_a_mailbox_has_one_holder_and_expired_leases_are_taken_over(registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    ids = await _mailboxes(registry, org, dovecot, 4)
    first, second = Leases(pool, f"a-{uuid.uuid4().hex[:6]}"), Leases(pool, f"b-{uuid.uuid4().hex[:6]}")
    assert (await first.claim(ids)).work == set(ids)
    assert (await second.claim(ids)).held == set()  # all held and alive: nothing to take yet
    await _expire(pool, first.holder)
    assert (await second.claim(ids)).work == set(ids)
    assert set((await _holders(pool, ids)).values()) == {second.holder}
    await second.release_all()
    await first.release_all()


async def test_a_replica_that_joins_gets_half_and_the_first_hands_over_only_on_release(
        registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    ids = await _mailboxes(registry, org, dovecot, 10)
    first, second = Leases(pool, f"a-{uuid.uuid4().hex[:6]}"), Leases(pool, f"b-{uuid.uuid4().hex[:6]}")
    try:
        assert (await first.claim(ids)).work == set(ids)
        joined = await second.claim(ids)  # counts as live from now on, although it holds nothing
        assert joined.held == set()
        over = await first.claim(ids)
        assert len(over.work) == 5 and len(over.surplus) == 5 and over.held == set(ids)
        # Until the first releases (its sessions stopped), the surplus stays its own: renewed, not taken.
        assert (await second.claim(ids)).held == set()
        assert (await first.claim(ids)).surplus == over.surplus, "the same surplus every time"
        await first.release(over.surplus)
        taken = await second.claim(ids)
        assert taken.work == over.surplus and not taken.surplus
        assert (await first.claim(ids)).work == over.work
        holders = await _holders(pool, ids)
        assert sorted(holders.values()).count(first.holder) == 5 and sorted(holders.values()).count(second.holder) == 5
        # The second dies: it no longer counts, and its mailboxes come back to the first.
        await _expire(pool, second.holder)
        assert (await first.claim(ids)).work == set(ids)
    finally:
        await first.release_all()
        await second.release_all()


async def test_two_ingest_replicas_share_the_mailboxes_and_never_work_one_together(
        settings, registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot, min_polling_interval_seconds=1))
    boxes = [await ready_mailbox(registry, org, dovecot, tracking="all") for _ in range(8)]
    options = IngestSettings(refresh_seconds=0.3, lease_ttl_seconds=3.0)
    first, second = IngestService(settings, options), IngestService(settings, options)
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    overlaps: list[uuid.UUID] = []

    def working(service: IngestService) -> set[uuid.UUID]:
        return {m for m, r in service.runners.items() if not r.task.done()}

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():  # a check every event-loop turn or so: the runners live in this loop
            overlaps.extend(working(first) & working(second))
            await asyncio.sleep(0.005)

    async def to_process() -> int:
        return len([w for w in await registry.mailboxes_to_process("incoming")
                    if w.profile["server_type"] in ("imap", "pop3")])

    watching = asyncio.Event()
    watcher = asyncio.create_task(watch(watching))
    tasks = [asyncio.create_task(run_service(first, stopping=stop_first))]
    try:
        mine = {b.id for b in boxes}
        await eventually(lambda: _all_in(mine, working(first)), timeout=30, what="the first replica working every mailbox")
        alone = await _leased(pool, first.holder, second.holder)
        assert alone[first.holder] >= mine and not alone[second.holder], "alone, it takes everything"

        joined = time.monotonic()
        tasks.append(asyncio.create_task(run_service(second, stopping=stop_second)))
        n = 0

        async def shared() -> bool:
            # Counted over every mailbox to process (other tests' mailboxes too: replicas share them all);
            # which replica works which mailbox is checked on this test's own (the others may be failing).
            nonlocal n
            leased = await _leased(pool, first.holder, second.holder)
            a, b = leased[first.holder], leased[second.holder]
            n = len(a) + len(b)
            half = math.ceil(n / 2)
            return (n == await to_process() and n - half <= len(a) <= half and n - half <= len(b) <= half
                    and working(first) & mine == a & mine and working(second) & mine == b & mine)
        await eventually(shared, timeout=20, what="each replica working about half the mailboxes")
        print(f"\nfair share reached {time.monotonic() - joined:.1f} s after the second replica started ({n} mailboxes)")
        assert not overlaps, f"{len(set(overlaps))} mailboxes worked by both replicas at once"
        stop_first.set()  # the first leaves cleanly: the second takes everything back
        await eventually(lambda: _all_in(mine, working(second)), timeout=20, what="the second replica taking over")
        assert not overlaps
    finally:
        stop_first.set()
        stop_second.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        watching.set()
        await watcher


async def _all_in(ids: set[uuid.UUID], working: set[uuid.UUID]) -> bool:
    return ids <= working


async def _leased(pool: asyncpg.Pool, *holders: str) -> dict[str, set[uuid.UUID]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT holder, mailbox_id FROM mailbox_lease WHERE holder = ANY($1::text[])", list(holders))
    leased: dict[str, set[uuid.UUID]] = {h: set() for h in holders}
    for r in rows:
        leased[r["holder"]].add(r["mailbox_id"])
    return leased
