"""Opening the registry for a command: settings, database (embedded or not), migrations, organization."""
from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import asyncpg

from shared.crypto import load_cipher
from shared.db.migrate import migrate, pending_migrations
from shared.db.pool import create_pool
from shared.errors import InvalidInput, NotFound
from shared.registry.models import Organization
from shared.registry.service import Registry
from shared.settings import Settings


@dataclass
class CommandContext:
    settings: Settings
    pool: asyncpg.Pool
    registry: Registry
    org: Organization


async def prepare_database(settings: Settings, pool: asyncpg.Pool) -> list[str]:
    """Embedded database: migrate as needed.  A real server: refuse to run on an old schema."""
    async with pool.acquire() as conn:
        if settings.embedded_database:
            return await migrate(conn)
        pending = await pending_migrations(conn)
        if pending:
            raise InvalidInput(f"the database needs migrations {', '.join(pending)}: run `conduit db migrate`")
        return []


@asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A small pool for one command, on a database that is up to date.  Embedded: only one that
    exists (a command run outside the folder `conduit up` uses would otherwise answer from a new,
    empty registry, as if everything were gone)."""
    if settings.embedded_database and not (settings.state_dir / "postgres").exists():
        raise NotFound(f"no Conduit state in {settings.state_dir.resolve()}: set CONDUIT_STATE_DIR to the folder "
                       "`conduit up` uses (by default .conduit in the folder it was started from), or DATABASE_URL; "
                       "`conduit up` or `conduit db migrate` creates a new one here")
    pool = await create_pool(settings, max_size=4, name="conduit-cli")
    try:
        await prepare_database(settings, pool)
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def command_context(settings: Settings, org_name: str) -> AsyncIterator[CommandContext]:
    async with database(settings) as pool:
        registry = Registry(pool, load_cipher(settings), producer="conduit-cli")
        yield CommandContext(settings, pool, registry, await registry.organization(org_name))
