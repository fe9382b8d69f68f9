"""Mailbox leases in PostgreSQL: several ingest replicas share the mailboxes, each mailbox worked by
exactly one replica; a dead replica's leases expire and the others take them over.

A replica claims at most its fair share (mailboxes / live replicas, rounded up) so a replica that
starts first does not keep everything; leases are renewed well within their time to live.
"""
from __future__ import annotations

import math
from typing import Sequence
from uuid import UUID

import asyncpg


class Leases:
    def __init__(self, pool: asyncpg.Pool, holder: str, ttl_seconds: float = 30.0) -> None:
        self._pool = pool
        self.holder = holder
        self.ttl = ttl_seconds

    async def claim(self, candidates: Sequence[UUID]) -> set[UUID]:
        """Renew what we hold, take free or expired leases up to our fair share; return what we hold."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE mailbox_lease SET expires_at = now() + make_interval(secs => $2) WHERE holder = $1",
                self.holder, self.ttl,
            )
            # Leases of mailboxes that are no longer to be processed go back.
            await conn.execute(
                "DELETE FROM mailbox_lease WHERE holder = $1 AND NOT (mailbox_id = ANY($2::uuid[]))",
                self.holder, list(candidates),
            )
            live = await conn.fetchval(
                "SELECT count(DISTINCT holder) FROM mailbox_lease WHERE expires_at > now() AND holder <> $1", self.holder
            )
            share = math.ceil(len(candidates) / (live + 1)) if candidates else 0
            held = await conn.fetchval("SELECT count(*) FROM mailbox_lease WHERE holder = $1", self.holder)
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
            elif held > share:
                # Others joined: give back the surplus so they get their share.
                await conn.execute(
                    """DELETE FROM mailbox_lease WHERE mailbox_id IN (
                         SELECT mailbox_id FROM mailbox_lease WHERE holder = $1 ORDER BY mailbox_id DESC LIMIT $2)""",
                    self.holder, held - share,
                )
            rows = await conn.fetch("SELECT mailbox_id FROM mailbox_lease WHERE holder = $1", self.holder)
        return {r["mailbox_id"] for r in rows}

    async def release_all(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute("DELETE FROM mailbox_lease WHERE holder = $1", self.holder)
