"""Ingest while its database is away for a few seconds: Conduit's own database failing is no failure
of the mailboxes.  asyncpg raises the socket's own OSError (a refused connection) when it cannot
connect, the same kind a mail server's refusal is: no mailbox may be alerted, counted as failing or
backed off for it, no runner may die of it (an ERROR with tracebacks, for every mailbox), and mail
that came meanwhile is ingested once the database answers again.

`conduit run ingest` rides the same outage out in one WARNING line at a time: no traceback from
asyncpg's pool restoring its floor of connections every few seconds, no ERROR.

A service started while the database is away (dispatch, which exits on losing it, starting again)
says in its one line that it cannot reach the database, and where, not "the system refused".

The database is cut off by a proxy in front of the embedded PostgreSQL (``tests.support.pgproxy``):
its port closed, so new connections are refused, and every open connection cut.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from conduit.peers.dovecot import Dovecot
from shared.db.pool import database_url
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.inbound import ROOT, ServiceProcess, ingest_running, mailbox_ingested, service_env
from tests.support.mailboxes import imap_profile, message, pop3_profile, ready_mailbox
from tests.support.pgproxy import PgProxy
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers

# How long the database stays away: several polling intervals (1 s) of every mailbox.
OUTAGE_SECONDS = 4.0


class _CuttingProxy(PgProxy):
    """The proxy, able to go away: ``refuse()`` closes its port (connections refused) and cuts every
    open connection; ``accept()`` listens again on the same port."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self._clients: set[asyncio.StreamWriter] = set()
        self._port = 0

    async def __aenter__(self) -> "_CuttingProxy":
        await super().__aenter__()
        assert self._server is not None
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._clients.add(client_writer)
        try:
            await super()._accept(client_reader, client_writer)
        finally:
            self._clients.discard(client_writer)

    async def refuse(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._clients):
            writer.transport.abort()   # the proxy then cuts the server's side too

    async def accept(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self._port)


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_database_outage_is_no_failure_of_the_mailboxes(
        settings: Settings, registry: Registry, org, dovecot: Dovecot, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="services.ingest")
    await registry.add_profile(org, imap_profile(dovecot))                       # the default: IDLE
    await registry.add_profile(org, pop3_profile(dovecot))                       # polled every second
    boxes = [await ready_mailbox(registry, org, dovecot),
             await ready_mailbox(registry, org, dovecot, profile="dovecot-pop3")]
    refused = {"service": "ingest", "error": "ConnectionRefusedError"}

    async with _CuttingProxy.for_url(database_url(settings)) as proxy:
        proxied = settings.model_copy(update={"database_url": SecretStr(proxy.url)})
        # Leases that outlast the outage: the runners keep working their mailboxes through it.
        async with ingest_running(proxied, refresh_seconds=1.0, lease_ttl_seconds=30.0):
            for box in boxes:
                await dovecot.append(box.email, box.password, message("before", to=box.email))
            for box in boxes:
                await mailbox_ingested(registry, org, box.email, 1)
            met = _count("conduit_infrastructure_failures_total", **refused)

            await proxy.refuse()
            for box in boxes:
                await dovecot.append(box.email, box.password, message("during", to=box.email))
            await asyncio.sleep(OUTAGE_SECONDS)   # the outage's length, not a wait for anything
            await proxy.accept()

            for box in boxes:
                await mailbox_ingested(registry, org, box.email, 2)
            for box in boxes:
                await dovecot.append(box.email, box.password, message("after", to=box.email))
            for box in boxes:
                await mailbox_ingested(registry, org, box.email, 3)

    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    tracebacks = [f"{r.name}: {r.getMessage()}" for r in caplog.records
                  if r.name.startswith("services.ingest") and r.exc_info]
    assert not tracebacks, tracebacks
    for box in boxes:
        state = await registry.mailbox(org, box.email)
        assert not state.alerts, f"{box.email}: {state.alerts}"
        assert state.incoming.error_count == 0 and state.incoming.backoff_until is None, state.incoming
    # The outage was met (the POP3 mailbox's sessions, every second), as the database's, and said
    # once for the replica, not at every session of every mailbox.
    assert _count("conduit_infrastructure_failures_total", **refused) >= met + 2
    said = [r for r in caplog.records if r.name == "services.ingest.runner"
            and "the database cannot be reached" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING, [r.getMessage() for r in said]


async def test_conduit_run_ingest_says_so_in_lines_without_tracebacks(
        settings: Settings, registry: Registry, org, dovecot: Dovecot, tmp_path: Path) -> None:
    await registry.add_profile(org, pop3_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot)
    async with _CuttingProxy.for_url(database_url(settings)) as proxy:
        env = {**service_env(settings, CONDUIT_INGEST_REFRESH_SECONDS="1", CONDUIT_INGEST_LEASE_TTL_SECONDS="30"),
               "DATABASE_URL": proxy.url}
        ingest = ServiceProcess("ingest", env, tmp_path / "ingest.log")
        await ingest.start()
        try:
            await eventually(ingest.ready, timeout=60, what="ingest ready")
            await dovecot.append(box.email, box.password, message("before", to=box.email))
            await mailbox_ingested(registry, org, box.email, 1)

            await proxy.refuse()
            await dovecot.append(box.email, box.password, message("during", to=box.email))

            async def floor_said() -> bool:
                return "Failed to restore the pool connection floor" in ingest.log.read_text(errors="replace")
            await eventually(floor_said, timeout=30, what="asyncpg's pool to say it cannot restore its floor")
            await asyncio.sleep(OUTAGE_SECONDS)   # the outage's length, not a wait for anything
            await proxy.accept()

            await mailbox_ingested(registry, org, box.email, 2)
        finally:
            status = await ingest.stop()
    log = ingest.log.read_text(errors="replace")
    assert status == 0, ingest.tail()
    assert not ingest.problems(), "\n".join(ingest.problems()) + "\n" + ingest.tail(60)
    floor = [line for line in log.splitlines() if "Failed to restore the pool connection floor" in line]
    assert floor and all(" WARNING asyncpg.pool: " in line and "ConnectionRefusedError" in line for line in floor), floor
    assert "the database cannot be reached" in log, ingest.tail(60)
    state = await registry.mailbox(org, box.email)
    assert not state.alerts and state.incoming.error_count == 0, (state.alerts, state.incoming)


@pytest.mark.parametrize("where", ["tcp", "unix"])
async def test_a_service_started_while_the_database_is_away_names_it(
        where: str, settings: Settings, tmp_path: Path) -> None:
    password = "never-shown-7"
    async with _CuttingProxy.for_url(database_url(settings)) as proxy:
        proxied = proxy.url
        await proxy.refuse()
        if where == "tcp":
            url, place = proxied.replace("postgres@", f"postgres:{password}@"), f"127.0.0.1:{proxy._port}"
            reason = "Connection refused"
        else:   # a Unix socket whose server is down (the embedded database's kind of URL)
            url = f"postgresql://postgres:{password}@/postgres?host={tmp_path}"
            place, reason = f"{tmp_path}/.s.PGSQL.5432", "No such file or directory"
        run = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conduit", "run", "dispatch", cwd=ROOT, env={**service_env(settings), "DATABASE_URL": url},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(run.communicate(), 120)
    text = err.decode()
    assert run.returncode == 2, text
    assert text.splitlines()[-1] == f"error: cannot reach the database at {place}: {reason}", text
    assert password not in text + out.decode() and "Traceback" not in text, text
