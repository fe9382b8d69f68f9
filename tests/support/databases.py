"""A database of a test's own on the session's PostgreSQL, for what must not share the session's:
a schema the test breaks, a stack that works every mailbox, a command that covers the whole database."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shared.db.migrate import migrate


@asynccontextmanager
async def scratch_database(server_url: str, prefix: str, *, template: str | None = None,
                           migrated: bool = False) -> AsyncIterator[str]:
    """A new database's URL (empty, or cloned from ``template``'s name; ``migrated``: with the
    schema), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    await _execute(server_url, f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    url = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    try:
        if migrated:
            conn = await asyncpg.connect(url)
            try:
                await migrate(conn)   # as an operator would have (a DATABASE_URL is never migrated implicitly)
            finally:
                await conn.close()
        yield url
    finally:
        await _execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


async def _execute(server_url: str, statement: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
