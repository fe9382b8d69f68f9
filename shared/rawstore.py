"""Raw MIME storage, content-addressed by SHA-256, in PostgreSQL.

Ingest stores a message here (committed) before it publishes the event that refers to it, so an
event never points at nothing and messages larger than the broker's limit travel by reference.
Identical bytes are stored once.  Evaluate and the CLI read them back by hash.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import asyncpg


def raw_sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


async def store_raw(conn: asyncpg.Connection, raws: Sequence[bytes]) -> list[str]:
    """Store messages (one statement for the batch); return their hashes in order."""
    hashes = [raw_sha256(r) for r in raws]
    if raws:
        await conn.execute(
            """INSERT INTO raw_message (sha256, size, data)
               SELECT * FROM unnest($1::text[], $2::int[], $3::bytea[])
               ON CONFLICT (sha256) DO NOTHING""",
            hashes, [len(r) for r in raws], list(raws),
        )
    return hashes


async def load_raw(conn: asyncpg.Connection, hashes: Iterable[str]) -> dict[str, bytes]:
    rows = await conn.fetch("SELECT sha256, data FROM raw_message WHERE sha256 = ANY($1::text[])", list(set(hashes)))
    return {r["sha256"]: r["data"] for r in rows}
