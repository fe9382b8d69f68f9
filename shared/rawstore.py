"""Raw MIME storage, content-addressed by SHA-256, in PostgreSQL.

Ingest stores a message here (committed) before it publishes the event that refers to it, so an
event never points at nothing and messages larger than the broker's limit travel by reference.
Identical bytes are stored once.  Evaluate and the CLI read them back by hash.

The column is stored without compression and, up to a page, inside the row (migration
0006_raw_store): pglz compression of each message was most of the store's cost.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import asyncpg


def raw_sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


async def store_raw(conn: asyncpg.Connection, raws: Sequence[bytes]) -> list[str]:
    """Store messages (atomically: all of the batch or none); return their hashes in order."""
    hashes = [raw_sha256(r) for r in raws]
    if not raws:
        return hashes
    present = {r["sha256"] for r in await conn.fetch(
        "SELECT sha256 FROM raw_message WHERE sha256 = ANY($1::text[])", list(set(hashes)))}
    rows = {}
    for sha, raw in zip(hashes, raws):
        if sha not in present:
            rows.setdefault(sha, (sha, len(raw), raw))
    if not rows:
        return hashes
    # COPY of the rows not yet stored rather than an INSERT per row: less work per row on the
    # server (bench/ingest_pipeline.py, docs/benchmarks.md "Ingest").  The same bytes stored by
    # another session since the look-up make COPY fail as a whole; the INSERT then skips them.
    try:
        if conn.is_in_transaction():
            async with conn.transaction():   # a savepoint: a conflict must not abort the caller's transaction
                await _copy(conn, rows.values())
        else:
            await _copy(conn, rows.values())
    except asyncpg.UniqueViolationError:
        await conn.executemany(
            "INSERT INTO raw_message (sha256, size, data) VALUES ($1, $2, $3) ON CONFLICT (sha256) DO NOTHING",
            list(rows.values()),
        )
    return hashes


async def _copy(conn: asyncpg.Connection, rows: Iterable[tuple[str, int, bytes]]) -> None:
    await conn.copy_records_to_table("raw_message", records=list(rows), columns=["sha256", "size", "data"])


async def load_raw(conn: asyncpg.Connection, hashes: Iterable[str]) -> dict[str, bytes]:
    rows = await conn.fetch("SELECT sha256, data FROM raw_message WHERE sha256 = ANY($1::text[])", list(set(hashes)))
    return {r["sha256"]: r["data"] for r in rows}
