"""Versioned migrations: numbered SQL files applied once each, in order, under an advisory lock.

Run by ``conduit db migrate`` (a Kubernetes Job in production); services never create tables.
Two migrators started at once serialise on the lock, so the Job and a developer's ``conduit up``
cannot race.
"""
from __future__ import annotations

import hashlib
from importlib import resources

import asyncpg

_LOCK_ID = 0x436F6E64  # "Cond"


def available_migrations() -> list[tuple[str, str]]:
    """(version, sql) for every migration file shipped with the package, in order."""
    folder = resources.files("shared.db") / "migrations"
    files = sorted(f for f in folder.iterdir() if f.name.endswith(".sql"))
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply what is missing; return the versions applied now."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migration (
                   version text PRIMARY KEY, checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"]: r["checksum"] for r in await conn.fetch("SELECT version, checksum FROM schema_migration")}
        applied = []
        for version, sql in available_migrations():
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if version in done:
                if done[version] != checksum:
                    raise RuntimeError(f"migration {version} changed after it was applied; add a new migration instead")
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migration (version, checksum) VALUES ($1, $2)", version, checksum)
            applied.append(version)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)


async def pending_migrations(conn: asyncpg.Connection) -> list[str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migration') IS NOT NULL")
    done = set()
    if exists:
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migration")}
    return [v for v, _ in available_migrations() if v not in done]
