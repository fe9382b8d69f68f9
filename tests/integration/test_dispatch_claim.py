"""The claim of due requests (``ledger.claim_due``) against PostgreSQL: oldest first, rows held by
another worker skipped, and a backlog read in order up to the limit, not whole, when the table's
statistics are those of a much smaller table (a burst that autovacuum has not analysed yet)."""
from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg

from services.dispatch import ledger
from shared.registry.service import Registry
from tests.support.dispatch import sending_mailbox
from tests.support.waiting import eventually

BACKLOG = 5_000


@contextlib.asynccontextmanager
async def backlog(pool: asyncpg.Pool, org_id: uuid.UUID, mailbox_id: uuid.UUID) -> AsyncIterator[list[uuid.UUID]]:
    """``BACKLOG`` due requests of one mailbox, oldest first (all due long before any other test's);
    removed afterwards, so no later dispatch run finds them."""
    async with pool.acquire() as conn:
        # The statistics of the table as it is now, before the burst: what the planner has to go on
        # until autovacuum analyses it again.
        await conn.execute("ANALYZE outbound_email")
        ids = [r["id"] for r in await conn.fetch(
            """INSERT INTO outbound_email (organization_id, idempotency_key, mailbox_id, status, message_id,
                                           request, next_attempt_at)
               SELECT $1, 'claim-' || $3 || '-' || n, $2, 'pending_send', 'claim-' || $3 || '-' || n || '@example.com',
                      '{}'::jsonb, now() - interval '30 days' + n * interval '1 millisecond'
               FROM generate_series(1, $4) AS n
               RETURNING id""",
            org_id, mailbox_id, uuid.uuid4().hex, BACKLOG)]
    try:
        yield ids
    finally:
        async with pool.acquire() as conn:
            await conn.execute("DELETE FROM outbound_email WHERE id = ANY($1::uuid[])", ids)


async def _due_index_reads(conn: asyncpg.Connection) -> int:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return await conn.fetchval(
        "SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = 'outbound_email_due'")


async def test_a_claim_reads_a_fresh_backlog_in_order_up_to_its_limit(registry: Registry, org, pool: asyncpg.Pool) -> None:
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=1)
    async with backlog(pool, org.id, sender.mailbox_id) as ids, pool.acquire() as conn, pool.acquire() as watcher:
        before = await _due_index_reads(watcher)
        async with conn.transaction():
            claimed = await ledger.claim_due(conn, [sender.mailbox_id], 20, 0, uuid.uuid4())
        # Pending statistics reach the shared view when a backend next goes idle; this makes it so.
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await conn.execute("SELECT 1")
        read = await eventually(lambda: _read_since(watcher, before), what="the claim's index reads in the statistics")

        assert {r["id"] for r in claimed} == set(ids[:20])
        # In order: about the 20 rows taken.  A bitmap scan of the backlog would read all 5,000.
        assert read < 500, f"the claim read {read} entries of the due index for 20 rows out of {BACKLOG}"


async def _read_since(watcher: asyncpg.Connection, before: int) -> int:
    return await _due_index_reads(watcher) - before


async def test_concurrent_claims_skip_each_others_rows_and_take_the_oldest(registry: Registry, org,
                                                                         pool: asyncpg.Pool) -> None:
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=1)
    async with backlog(pool, org.id, sender.mailbox_id) as ids, pool.acquire() as first, pool.acquire() as second:
        holding = first.transaction()
        await holding.start()
        try:
            taken_first = await ledger.claim_due(first, [sender.mailbox_id], 50, 1, uuid.uuid4())
            # The first worker's transaction is still open: its rows are locked, not yet `sending`
            # for anyone else.  The second worker must skip them, not wait for them.
            async with second.transaction():
                taken_second = await asyncio.wait_for(
                    ledger.claim_due(second, [sender.mailbox_id], 50, 2, uuid.uuid4()), timeout=10)
        finally:
            await holding.commit()

        assert {r["id"] for r in taken_first} == set(ids[:50])
        assert {r["id"] for r in taken_second} == set(ids[50:100])
        workers = dict(await first.fetch(
            "SELECT id, worker_id FROM outbound_email WHERE id = ANY($1::uuid[]) AND status = 'sending'", ids))
        assert {workers[i] for i in ids[:50]} == {1} and {workers[i] for i in ids[50:100]} == {2}
        assert len(workers) == 100
