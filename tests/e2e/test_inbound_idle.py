"""IMAP IDLE, end to end: with ingest and evaluate running as long-lived services and a polling
interval of ten minutes, a message delivered to an idling mailbox becomes an activity in seconds.

Only IDLE can explain that: the next poll is 600 s away, and the Dovecot log shows no new login
for the mailbox between the moment IDLE was entered and the moment the activity appeared (the same
session that was idling fetched the message).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.evaluate.service import EvaluateService
from services.ingest.service import IngestService, IngestSettings
from shared.lifecycle import run_service
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.mailboxes import imap_profile, message, ready_mailbox
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers

POLL_SECONDS = 600
WITHIN_SECONDS = 15


async def _activity(pool: asyncpg.Pool, org, message_id: str) -> asyncpg.Record | None:
    async with pool.acquire() as conn:
        return await conn.fetchrow("SELECT id, created_at FROM email_activity WHERE organization_id = $1 AND message_id = $2",
                                   org.id, message_id)


def _logins(dovecot, email: str) -> int:
    text = dovecot.log_path.read_text(errors="replace") if dovecot.log_path.exists() else ""
    return text.count(f"Login: user=<{email}>")


@contextlib.asynccontextmanager
async def _services(settings: Settings, **ingest_options: float) -> AsyncIterator[tuple[IngestService, list[asyncio.Task]]]:
    """Evaluate and ingest running as long-lived services for the block, then stopped."""
    stopping = asyncio.Event()
    ingest = IngestService(settings, IngestSettings(refresh_seconds=1.0, lease_ttl_seconds=10.0, **ingest_options))
    tasks = [asyncio.create_task(run_service(EvaluateService(settings), stopping=stopping), name="evaluate"),
             asyncio.create_task(run_service(ingest, stopping=stopping), name="ingest")]
    try:
        yield ingest, tasks
    finally:
        stopping.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)


async def _idling(ingest: IngestService, box, *, after=None):
    """The mailbox's runner once its session is in IDLE (a runner other than ``after``, if given)."""
    async def check():
        running = ingest.runners.get(box.id)
        return running is not None and running is not after and running.runner.idling and running
    return await eventually(check, timeout=60, what="the mailbox's session to enter IDLE")


def _deliver(dovecot, box, tag: str, folder: str = "INBOX") -> str:
    """Deliver a message to the mailbox's ``folder``; its Message-ID."""
    message_id = f"{tag}@customer.example"
    dovecot.deliver(box.email, message(tag, to=box.email, message_id=f"<{message_id}>"), folder=folder)
    return message_id


async def _tracked(pool: asyncpg.Pool, org, message_id: str, *, timeout: float = WITHIN_SECONDS,
                   interval: float = 0.05, what: str) -> None:
    await eventually(lambda: _activity(pool, org, message_id), timeout=timeout, interval=interval, what=what)


async def test_idle_delivers_a_new_message_long_before_the_next_poll(
        settings: Settings, registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    # "localhost" rather than 127.0.0.1: the same Dovecot, but a server of its own for ingest's
    # per-server connection budget, so mailboxes other tests left on 127.0.0.1 cannot use up the
    # IDLE allowance of this one.
    profile = await registry.add_profile(org, imap_profile(dovecot, incoming_host="localhost",
                                                           min_polling_interval_seconds=POLL_SECONDS))
    box = await ready_mailbox(registry, org, dovecot, tracking="all")
    before = _deliver(dovecot, box, "idle-before")
    async with _services(settings) as (ingest, tasks):
        # The first session syncs what is there (and evaluate has joined its group once it is decided).
        await _tracked(pool, org, before, timeout=90, what="the activity of the message already there")
        running = await _idling(ingest, box)
        logins = _logins(dovecot, box.email)
        assert logins >= 1, "Dovecot logs logins (the check below relies on it)"

        started = time.monotonic()
        await _tracked(pool, org, _deliver(dovecot, box, "idle-pushed"), interval=0.02,
                       what=f"the activity within {WITHIN_SECONDS} s (the next poll is {POLL_SECONDS} s away)")
        print(f"\nIDLE: delivered -> activity in {(time.monotonic() - started) * 1000:.0f} ms")

        assert ingest.runners.get(box.id) is running and not running.task.done(), "the same runner, never restarted"
        assert _logins(dovecot, box.email) == logins, "no new session: the idling one fetched the message"
        assert all(not t.done() for t in tasks), "both services still run"

        # The profile edited (`conduit profile set`): the mailbox's session starts again with the new
        # settings, without a restart of the service, and idles again.
        await registry.update_profile(org, profile.name, max_concurrent_connections=5)
        await _idling(ingest, box, after=running)
        assert _logins(dovecot, box.email) > logins
        await _tracked(pool, org, _deliver(dovecot, box, "idle-after"), what="the activity of a message pushed to the new session")


async def test_mail_that_follows_new_mail_is_found_by_polling_the_idling_session(
        settings: Settings, registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    """After new mail, the session polls with NOOP for a while (``follow_up_seconds``) rather than wait
    out Dovecot's 500 ms IDLE delay for the next message.  With a follow-up longer than the test and
    polling 600 s away, only that polling can find the second message, and on the same session."""
    await registry.add_profile(org, imap_profile(dovecot, incoming_host="localhost",
                                                 min_polling_interval_seconds=POLL_SECONDS))
    box = await ready_mailbox(registry, org, dovecot, tracking="all")
    before = _deliver(dovecot, box, "follow-before")
    async with _services(settings, follow_up_seconds=POLL_SECONDS, follow_up_poll_seconds=0.05) as (ingest, _):
        # Once this is an activity, evaluate has joined its group.  (Only mail found while idling is
        # followed up: after its first sync the session idles.)
        await _tracked(pool, org, before, timeout=90, what="the activity of the message already there")
        running = await _idling(ingest, box)
        logins = _logins(dovecot, box.email)
        await _tracked(pool, org, _deliver(dovecot, box, "follow-first"), what="the first message's activity (through IDLE)")
        assert not running.runner.idling, "following up: polling, not idling"
        await _tracked(pool, org, _deliver(dovecot, box, "follow-second"),
                       what="the second message's activity (through the follow-up's polling)")
        assert not running.runner.idling and ingest.runners.get(box.id) is running
        assert _logins(dovecot, box.email) == logins, "the same session found both"


async def test_other_tracked_folders_are_synced_on_the_interval_while_the_inbox_is_followed_up(
        settings: Settings, registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    """A busy Inbox keeps its session following up; the other tracked folders still get their sync
    at the profile's polling interval (here 2 s, against a follow-up that would last 600 s)."""
    await registry.add_profile(org, imap_profile(dovecot, incoming_host="localhost", min_polling_interval_seconds=2))
    box = await ready_mailbox(registry, org, dovecot, tracking="all", tracked_folders=["INBOX", "Projects"])
    before = _deliver(dovecot, box, "others-before", "Projects")
    async with _services(settings, follow_up_seconds=POLL_SECONDS, follow_up_poll_seconds=0.05) as (ingest, _):
        await _tracked(pool, org, before, timeout=90, what="the activity of the message already in Projects")
        running = await _idling(ingest, box)
        await _tracked(pool, org, _deliver(dovecot, box, "others-inbox"), what="the Inbox message's activity")
        await _tracked(pool, org, _deliver(dovecot, box, "others-projects", "Projects"),
                       what="the Projects message's activity, on the polling interval")
        assert ingest.runners.get(box.id) is running and not running.task.done(), "the same session throughout"


async def test_an_idling_queue_removes_processed_mail_on_the_polling_interval(
        settings: Settings, registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    """A queue that deletes after processing: mail that arrived while its session idles is removed
    from the server once its activity is recorded, by the same session, within the polling interval
    (here 2 s), not only when the session ends."""
    await registry.add_profile(org, imap_profile(dovecot, incoming_host="localhost", min_polling_interval_seconds=2))
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", delete_after_processing=True)
    before = _deliver(dovecot, queue, "queue-before")
    async with _services(settings) as (ingest, _):
        await _tracked(pool, org, before, timeout=90, what="the activity of the message already there")
        running = await _idling(ingest, queue)
        await _tracked(pool, org, _deliver(dovecot, queue, "queue-pushed"), what="the pushed message's activity")

        async def removed() -> bool:
            return dovecot.message_count(queue.email) == 0
        await eventually(removed, timeout=WITHIN_SECONDS, what="processed mail removed while the session idles")
        assert ingest.runners.get(queue.id) is running and not running.task.done(), "the same session removed it"


async def test_a_mailbox_beyond_the_connection_limit_is_polled_while_the_others_idle(
        settings: Settings, registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    """Two mailboxes idle on a profile allowing two connections; a third one added later must not
    wait for a connection for ever: the IDLE allowance shrinks to one, a runner that loses it starts
    again polling, and the third mailbox's mail is found."""
    await registry.add_profile(org, imap_profile(dovecot, incoming_host="localhost", min_polling_interval_seconds=1,
                                                 max_concurrent_connections=2))
    first, second = [await ready_mailbox(registry, org, dovecot, tracking="all") for _ in range(2)]
    before = _deliver(dovecot, first, "limit-before")
    async with _services(settings) as (ingest, _):
        await _tracked(pool, org, before, timeout=90, what="the activity of the first mailbox's message")
        await _idling(ingest, first)
        await _idling(ingest, second)
        third = await ready_mailbox(registry, org, dovecot, tracking="all")
        await _tracked(pool, org, _deliver(dovecot, third, "limit-third"), timeout=30,
                       what="the activity of mail in the mailbox added beyond the connection limit")
        idling = [b for b in (first, second, third) if (r := ingest.runners.get(b.id)) and r.runner.idling]
        assert len(idling) <= 1, "one connection is kept free for polling"


class _SilentRelay:
    """A TCP relay in front of Dovecot that can go silent: it keeps both connections open and
    forwards nothing more (what a NAT or firewall that dropped the flow, or a hung server, looks
    like to the client; its own kernel still acknowledges, so TCP keepalive cannot tell)."""

    def __init__(self, port: int) -> None:
        self._port = port
        self.silent = False
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "_SilentRelay":
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if not self.silent:
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer), return_exceptions=True)


async def test_an_idling_session_whose_connection_goes_silent_is_noticed_within_the_idle_check(
        settings: Settings, registry: Registry, org, dovecot) -> None:
    """IDLE alone never notices a connection that went silent; before, it waited out 25 minutes
    with new mail unseen.  Now it looks at the Inbox every idle check, and that look times out."""
    async with _SilentRelay(dovecot.imap_port) as relay:
        await registry.add_profile(org, imap_profile(dovecot, name="silent", incoming_port=relay.port,
                                                     min_polling_interval_seconds=POLL_SECONDS))
        box = await ready_mailbox(registry, org, dovecot, profile="silent")
        async with _services(settings, idle_check_seconds=1.0, command_timeout_seconds=2.0) as (ingest, _):
            await _idling(ingest, box)
            relay.silent = True
            started = time.monotonic()

            async def noticed() -> bool:
                mailbox = await registry.mailbox(org, box.email)
                return mailbox.incoming.error_count >= 1 and mailbox.alerts[0].code == "timeout"
            await eventually(noticed, timeout=WITHIN_SECONDS, what="the silent connection noticed")
            print(f"\nsilent connection noticed in {time.monotonic() - started:.1f} s")
