"""Versioned migrations: numbered SQL files applied once each, in order, under an advisory lock.

Run by ``conduit db migrate`` (a Kubernetes Job in production); services never create tables.
Two migrators started at once serialise on the lock, so the Job and a developer's ``conduit up``
cannot race.
"""
from __future__ import annotations

import hashlib
from importlib import resources

import asyncpg

from shared.errors import PermanentError

_LOCK_ID = 0x436F6E64  # "Cond"
# Waiting for another migrator, or an index built on a large table, may take longer than the pool's
# bound on a statement (``CONDUIT_DATABASE_COMMAND_TIMEOUT_SECONDS``): a migration is never cut short.
_NO_BOUND = 7 * 24 * 3600.0


class SchemaMismatch(PermanentError):
    """The database's schema and this code's migrations disagree: mend it, retrying cannot help."""

    reason = "schema_mismatch"


def available_migrations() -> list[tuple[str, str]]:
    """(version, sql) for every migration file shipped with the package, in order."""
    folder = resources.files("shared.db") / "migrations"
    files = sorted(f for f in folder.iterdir() if f.name.endswith(".sql"))
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply what is missing; return the versions applied now."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID, timeout=_NO_BOUND)
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
                    raise SchemaMismatch(f"migration {version} was changed after it was applied to this database (its "
                                         "checksum differs): ship changes as a new migration, and put the applied "
                                         "one back as it was")
                continue
            async with conn.transaction():
                await conn.execute(sql, timeout=_NO_BOUND)
                await conn.execute("INSERT INTO schema_migration (version, checksum) VALUES ($1, $2)", version, checksum)
            applied.append(version)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)


async def check_schema(conn: asyncpg.Connection) -> list[str]:
    """For a service starting: refuse a database that lacks migrations this code needs (it would
    fail later, query by query, while its probes said ready); return the versions applied there
    that this code does not know (a rollback after an upgrade: worth a warning, not a refusal)."""
    pending = await pending_migrations(conn)
    if pending:
        raise SchemaMismatch(f"the database needs migrations {', '.join(pending)}: run `conduit db migrate` first")
    known = {version for version, _ in available_migrations()}
    return [r["version"] for r in await conn.fetch("SELECT version FROM schema_migration ORDER BY version")
            if r["version"] not in known]


async def pending_migrations(conn: asyncpg.Connection) -> list[str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migration') IS NOT NULL")
    done = set()
    if exists:
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migration")}
    return [v for v, _ in available_migrations() if v not in done]
