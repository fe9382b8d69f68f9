"""Mailbox leases in PostgreSQL: several ingest replicas share the mailboxes, each mailbox worked by
exactly one replica; a dead replica's leases expire and the others take them over.

Every replica renews a heartbeat row (`ingest_replica`) with its leases, so a replica that has just
started and holds nothing yet still counts as live.  A replica's fair share is the mailboxes divided
by the live replicas, rounded up: it claims free or expired leases up to that share, and one holding
more than its share (because others joined) hands the surplus over.  The hand-over is two steps so
a mailbox is never worked by two replicas at once: ``claim`` names the surplus (still leased, still
renewed, but no longer to be worked); the caller stops the surplus mailboxes' sessions and only
then calls ``release``, after which the lease is free for the others.

A replica may still be finishing a session when its lease has been taken over: it could not renew
in time (the database was away, the process stalled), or a one-shot run outlived its lease.  What
that session writes is fenced: each transaction that records a mailbox's progress first takes a
share lock on the lease row and checks that this replica still holds it (``hold``); the raw
store checks the same before anything is published (``state.already_ingested``), and a queue
before it chooses what to remove from the server (``state.deletable``).  A takeover waits
for such a transaction to commit, and every later one fails with ``LeaseLost``: the stale session
ends without recording anything, and the refusals it saw are not counted twice.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg

from shared.errors import ConduitError


class LeaseLost(ConduitError):
    """Another replica holds the mailbox's lease now: this replica's session must stop, recording
    nothing more.  Not a failure of the mailbox (no alert, no back-off)."""

    reason = "lease_lost"

    def __init__(self, mailbox_id: UUID) -> None:
        super().__init__(f"mailbox {mailbox_id}: another replica holds its lease now")


async def hold(conn: asyncpg.Connection, mailbox_id: UUID, holder: str | None) -> None:
    """Inside a transaction: raise ``LeaseLost`` unless ``holder`` holds the mailbox's lease, and keep
    it from being taken over until the transaction ends.  ``holder`` None: a run without leases
    (a test or a benchmark driving a runner directly), nothing to check."""
    if holder is None:
        return
    held = await conn.fetchval("SELECT true FROM mailbox_lease WHERE mailbox_id = $1 AND holder = $2 FOR SHARE",
                               mailbox_id, holder)
    if not held:
        raise LeaseLost(mailbox_id)


@dataclass(frozen=True)
class Claim:
    """What a replica holds after a claim: ``work`` to keep working, ``surplus`` to stop then release."""

    work: set[UUID] = field(default_factory=set)
    surplus: set[UUID] = field(default_factory=set)

    @property
    def held(self) -> set[UUID]:
        return self.work | self.surplus


class Leases:
    def __init__(self, pool: asyncpg.Pool, holder: str, ttl_seconds: float = 30.0) -> None:
        self._pool = pool
        self.holder = holder
        self.ttl = ttl_seconds

    async def claim(self, candidates: Sequence[UUID], *, fair_share: bool = True) -> Claim:
        """Heartbeat, renew what we hold, take free or expired leases up to our fair share, and name
        what we hold beyond it.

        ``fair_share=False`` (a one-shot run): no heartbeat, and every free or expired lease is taken;
        such a run is not a replica the others should make room for, and it must not leave a mailbox
        out because some replica happens to be alive."""
        async with self._pool.acquire() as conn, conn.transaction():
            if fair_share:
                await conn.execute(
                    """INSERT INTO ingest_replica (holder, expires_at) VALUES ($1, now() + make_interval(secs => $2))
                       ON CONFLICT (holder) DO UPDATE SET expires_at = EXCLUDED.expires_at""",
                    self.holder, self.ttl,
                )
            # Dead replicas' rows go (their leases expire on their own and are taken over).
            await conn.execute("DELETE FROM ingest_replica WHERE expires_at < now() - interval '1 minute'")
            await conn.execute(
                "UPDATE mailbox_lease SET expires_at = now() + make_interval(secs => $2) WHERE holder = $1",
                self.holder, self.ttl,
            )
            live = await conn.fetchval("SELECT count(*) FROM ingest_replica WHERE expires_at > now()") if fair_share else 1
            share = math.ceil(len(candidates) / max(live, 1)) if candidates else 0
            held = await conn.fetchval("SELECT count(*) FROM mailbox_lease WHERE holder = $1 AND mailbox_id = ANY($2::uuid[])",
                                       self.holder, list(candidates))
            if held < share:
                await conn.execute(
                    """INSERT INTO mailbox_lease (mailbox_id, holder, expires_at)
                       SELECT c.id, $1, now() + make_interval(secs => $3)
                       FROM unnest($2::uuid[]) AS c(id)
                       LEFT JOIN mailbox_lease l ON l.mailbox_id = c.id
                       WHERE l.mailbox_id IS NULL OR l.expires_at < now()
                       ORDER BY c.id LIMIT $4
                       ON CONFLICT (mailbox_id) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
                       WHERE mailbox_lease.expires_at < now()""",
                    self.holder, list(candidates), self.ttl, share - held,
                )
            rows = await conn.fetch("SELECT mailbox_id FROM mailbox_lease WHERE holder = $1 ORDER BY mailbox_id", self.holder)
        wanted = set(candidates)
        held_ids = [r["mailbox_id"] for r in rows if r["mailbox_id"] in wanted]
        # Leases of mailboxes no longer to be processed (deactivated, backing off) go back like a
        # surplus: once their sessions have stopped, which may still be recording a batch.
        gone = {r["mailbox_id"] for r in rows} - wanted
        # Others joined: the highest ids beyond our share are handed over (the same ones every time,
        # so a surplus mailbox stays surplus until released).
        keep = max(share, 0)
        return Claim(work=set(held_ids[:keep]), surplus=set(held_ids[keep:]) | gone)

    async def renew(self) -> None:
        """Extend what we hold, without a heartbeat or a claim (a one-shot run that outlives a lease)."""
        async with self._pool.acquire() as conn:
            await conn.execute(
                "UPDATE mailbox_lease SET expires_at = now() + make_interval(secs => $2) WHERE holder = $1",
                self.holder, self.ttl,
            )

    async def release(self, mailbox_ids: Iterable[UUID]) -> None:
        """Give leases back (their sessions have stopped): free at once for the other replicas."""
        ids = list(mailbox_ids)
        if ids:
            async with self._pool.acquire() as conn:
                await conn.execute("DELETE FROM mailbox_lease WHERE holder = $1 AND mailbox_id = ANY($2::uuid[])",
                                   self.holder, ids)

    async def release_all(self) -> None:
        """Stopping: every lease goes back and the replica no longer counts as live."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM mailbox_lease WHERE holder = $1", self.holder)
            await conn.execute("DELETE FROM ingest_replica WHERE holder = $1", self.holder)
