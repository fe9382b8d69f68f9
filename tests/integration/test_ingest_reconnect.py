"""A mail server that ends an idling session (its BYE on a restart or shutdown, the connection
closed) against a real Dovecot: the mailbox signs in again with no failure recorded; a server away
for longer than the grace is a failure, from which the mailbox recovers by itself; a stop while the
runner waits to sign in again is prompt.

The server ends sessions as it does in production: `doveadm kick` makes the user's imap process say
"* BYE Server shutting down." and exit; stopping a Dovecot of the test's own does the same for every
session, after which nothing listens until it starts again on the same ports.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone

import asyncpg
import pytest

from conduit.peers.dovecot import Dovecot
from services.ingest.runner import CUT_SHORT_BEFORE_FAILURE, MailboxRunner, RunnerContext, ServerSlots
from services.ingest.service import IngestService
from shared.oauth import TokenProvider
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.inbound import ingest_running, mailbox_ingested
from tests.support.mailboxes import imap_profile, message, ready_mailbox
from tests.support.relay import CLOSE, line_relay
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers

# Polling is this far away: mail found within a test came through IDLE on a new session.
POLL_SECONDS = 600


@pytest.fixture
async def own_dovecot(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Dovecot]:
    """A Dovecot of this test's own, which the test may stop and start again."""
    async with Dovecot(tmp_path_factory.mktemp("dovecot")) as server:
        yield server


async def _start_again(server: Dovecot) -> None:
    """Start a stopped Dovecot on the ports it had (``start`` would choose new ones), as a restarted
    server comes back where the profile points."""
    server._choose_ports = lambda: None  # type: ignore[method-assign]
    await server.start()


async def _kick(dovecot: Dovecot, email: str) -> None:
    """End the user's sessions the way Dovecot does on shutdown: "* BYE Server shutting down."."""
    kick = await asyncio.create_subprocess_exec("doveadm", "-c", str(dovecot.config_path), "kick", email,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await kick.communicate()
    assert kick.returncode == 0 and email.encode() in output, output


def _logins(dovecot: Dovecot, email: str) -> int:
    text = dovecot.log_path.read_text(errors="replace") if dovecot.log_path.exists() else ""
    return text.count(f"Login: user=<{email}>")


# Ingest running as a long-lived service for the block, then stopped.
_ingest = functools.partial(ingest_running, refresh_seconds=1.0, lease_ttl_seconds=10.0)


async def _idling(ingest: IngestService, box, *, after=None):
    """The mailbox's runner once its session is in IDLE (a runner other than ``after``, if given)."""
    async def check():
        running = ingest.runners.get(box.id)
        return running is not None and running is not after and running.runner.idling and running
    return await eventually(check, timeout=30, what="the mailbox's session to enter IDLE")


async def _done(task: asyncio.Task) -> bool:
    return task.done()


async def _idle(runner: MailboxRunner) -> bool:
    return runner.idling


async def test_a_server_ending_an_idling_session_is_not_a_failure(
        settings: Settings, registry: Registry, org, dovecot: Dovecot, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="services.ingest.runner")
    await registry.add_profile(org, imap_profile(dovecot, min_polling_interval_seconds=POLL_SECONDS))
    box = await ready_mailbox(registry, org, dovecot)
    async with _ingest(settings) as ingest:
        running = await _idling(ingest, box)
        logins = _logins(dovecot, box.email)
        await _kick(dovecot, box.email)

        async def signed_in_again_or_failed():
            state = await registry.mailbox(org, box.email)
            if state.alerts or state.incoming.error_count:
                return state        # a failure recorded: the assertions below say which
            return running.runner.idling and _logins(dovecot, box.email) > logins and state
        state = await eventually(signed_in_again_or_failed, timeout=20,
                                 what="a new session of the mailbox in IDLE, or a failure recorded")
        assert not state.alerts, f"no alert for a server that ended the session: {state.alerts}"
        assert state.incoming.error_count == 0 and state.incoming.backoff_until is None
        assert ingest.runners.get(box.id) is running and not running.task.done(), "the same runner signed in again"

        await dovecot.append(box.email, box.password, message("after the BYE", to=box.email))
        await mailbox_ingested(registry, org, box.email, 1, timeout=20)
        state = await registry.mailbox(org, box.email)
        assert not state.alerts and state.incoming.error_count == 0 and state.incoming.backoff_until is None

    said = [r for r in caplog.records if r.name == "services.ingest.runner" and str(box.id) in r.getMessage()
            and "Server shutting down" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno in (logging.INFO, logging.WARNING), \
        [r.getMessage() for r in caplog.records if r.name == "services.ingest.runner"]
    assert box.password not in said[0].getMessage()


async def test_a_reconnection_refused_for_its_password_is_a_failure_at_once(
        settings: Settings, registry: Registry, org, dovecot: Dovecot) -> None:
    """Only a connection that fails is retried within the grace: a refused password is not the
    server restarting, and is recorded at the first attempt (the grace here is 60 s)."""
    await registry.add_profile(org, imap_profile(dovecot, min_polling_interval_seconds=POLL_SECONDS))
    box = await ready_mailbox(registry, org, dovecot)
    async with _ingest(settings, reconnect_grace_seconds=60) as ingest:
        running = await _idling(ingest, box)
        dovecot.set_password(box.email, "changed-on-the-server")  # the open session is not affected
        await _kick(dovecot, box.email)

        async def failed():
            state = await registry.mailbox(org, box.email)
            return state.incoming.error_count and state
        state = await eventually(failed, timeout=20, what="the refused reconnection recorded as a failure")
        assert [a.code for a in state.alerts] == ["authentication_failed"], [a.message for a in state.alerts]
        assert state.incoming.error_count == 1 and state.incoming.backoff_until is not None
        await eventually(lambda: _done(running.task), what="the runner to end")


async def test_a_server_away_past_the_grace_is_a_failure_and_the_mailbox_recovers(
        settings: Settings, registry: Registry, org, own_dovecot: Dovecot, pool: asyncpg.Pool) -> None:
    grace = 2.0
    await registry.add_profile(org, imap_profile(own_dovecot, min_polling_interval_seconds=POLL_SECONDS))
    box = await ready_mailbox(registry, org, own_dovecot)
    async with _ingest(settings, reconnect_grace_seconds=grace) as ingest:
        running = await _idling(ingest, box)
        went_away = datetime.now(timezone.utc)
        await own_dovecot.stop()        # "* BYE Server shutting down." to every session, then nothing listens

        async def failed():
            state = await registry.mailbox(org, box.email)
            return state.incoming.error_count and state
        state = await eventually(failed, timeout=grace + 20, what="the failure once the grace has passed")
        assert [a.code for a in state.alerts] == ["connection_failed"], [a.message for a in state.alerts]
        assert state.incoming.error_count == 1 and state.incoming.backoff_until is not None
        waited = (state.alerts[0].created_at - went_away).total_seconds()
        assert waited >= grace, f"recorded {waited:.2f} s after the server went away, within the {grace} s grace"
        await eventually(lambda: _done(running.task), what="the runner to end")

        # The server is back; the back-off (30 s for a first failure) is made to end now rather than
        # waited out, as its end is not what this test is about.  The mailbox recovers by itself.
        await _start_again(own_dovecot)
        async with pool.acquire() as conn:
            await conn.execute("UPDATE mailbox SET incoming_backoff_until = now() WHERE id = $1", box.id)
        await _idling(ingest, box, after=running)
        state = await registry.mailbox(org, box.email)
        assert state.incoming.error_count == 0 and state.incoming.backoff_until is None
        assert state.alerts[0].code == "recovered"
        await own_dovecot.append(box.email, box.password, message("after the restart", to=box.email))
        await mailbox_ingested(registry, org, box.email, 1, timeout=20)


async def test_stopping_while_waiting_to_sign_in_again_is_prompt(
        settings: Settings, registry: Registry, org, own_dovecot: Dovecot, pool: asyncpg.Pool, publisher) -> None:
    """The runner is driven directly, so nothing else shares its event loop's time (and with the
    grace's default, 60 s, the stop comes well within it)."""
    await registry.add_profile(org, imap_profile(own_dovecot, min_polling_interval_seconds=POLL_SECONDS))
    box = await ready_mailbox(registry, org, own_dovecot)
    work = (await registry.mailboxes_to_process("incoming", mailbox_ids=[box.id]))[0]
    runner = MailboxRunner(RunnerContext(pool, publisher, registry, ServerSlots(), TokenProvider()), work, idle_allowed=True)
    stopping = asyncio.Event()
    task = asyncio.create_task(runner.run(stopping))
    try:
        await eventually(lambda: _idle(runner), timeout=30, what="the session to enter IDLE")
        await own_dovecot.stop()        # and it stays away

        async def waiting_or_ended():
            return task.done() or runner.reconnecting
        await eventually(waiting_or_ended, what="the runner to wait to sign in again (or to end)")
        assert not task.done(), "the runner waits to sign in again; it did not end with a failure"
        # The first wait is 0.5-2 s and began when the session ended, moments ago: a stop that
        # waited it out would take longer than this.
        started = time.monotonic()
        stopping.set()
        await asyncio.wait_for(task, 5)
        took = time.monotonic() - started
        assert took < 0.3, f"the runner took {took:.2f} s to stop"
    finally:
        stopping.set()
        await asyncio.wait_for(task, 60)
    state = await registry.mailbox(org, box.email)
    assert not state.alerts and state.incoming.error_count == 0 and state.incoming.backoff_until is None


async def test_a_server_that_ends_every_session_soon_after_sign_in_is_a_failure(settings, registry: Registry, org,
                                                                             dovecot, pool, publisher) -> None:
    """A server (or a middlebox) that drops every session as it starts to idle: not a restart to be
    met quietly for ever, but a failure after a few sessions in a row, and never at once."""
    sessions: list[float] = []
    relay, port = await line_relay(dovecot.host, dovecot.imap_port,
                                   lambda line: CLOSE if line.endswith(b" IDLE\r\n") else None,
                                   on_session=lambda: sessions.append(time.monotonic()))
    await registry.add_profile(org, imap_profile(dovecot, incoming_host="127.0.0.1", incoming_port=port))
    box = await ready_mailbox(registry, org, dovecot)
    work = (await registry.mailboxes_to_process("incoming", mailbox_ids=[box.id]))[0]
    runner = MailboxRunner(RunnerContext(pool, publisher, registry, ServerSlots(), TokenProvider(), reconnect_grace=0),
                           work, idle_allowed=True)
    try:
        await asyncio.wait_for(runner.run(asyncio.Event()), timeout=60)   # ends by itself, with a failure
    finally:
        relay.close()
    assert len(sessions) == CUT_SHORT_BEFORE_FAILURE
    assert min(b - a for a, b in zip(sessions, sessions[1:])) >= 0.5, "never signed in again at once"
    state = await registry.mailbox(org, box.email)
    assert state.incoming.error_count == 1 and state.incoming.backoff_until is not None
    assert [a.code for a in state.alerts] == ["connection_failed"]
    assert "sessions in a row" in state.alerts[0].message
