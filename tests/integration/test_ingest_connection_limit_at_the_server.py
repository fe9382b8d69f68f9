"""Ingest keeps to its profile's "max concurrent connections" at the server: counted by a relay in
front of Dovecot (``CountingRelay``, which counts a connection as closed the moment its client closed
it), six mailboxes on one profile allowing two connections never have more than two open at once,
while all their mail is ingested: in a one-shot run (six sessions contending for two slots) and with
ingest running, one mailbox idling and the others polling through the connection left over.  After
the limit is edited, once every mailbox works in a new session, the new limit holds in the same way.

Against Dovecot, PostgreSQL and the broker; ingest runs in this process, so the test can tell when
every mailbox has started its new session."""
from __future__ import annotations


import asyncpg
import pytest

from services.ingest.service import IngestService
from shared.lifecycle import run_service
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.counting_relay import CountingRelay
from tests.support.inbound import ingest_running, ingested_count
from tests.support.mailboxes import imap_profile, message, ready_mailbox
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers

MAILBOXES = 6
PER_MAILBOX = 15
LIMIT = 2


def _deliver(dovecot, boxes, round_: int) -> None:
    for box in boxes:
        dovecot.deliver_many(box.email, [message(f"r{round_} m{i}", to=box.email) for i in range(PER_MAILBOX)])


async def _all_ingested(pool: asyncpg.Pool, org, expected: int) -> None:
    async def done() -> bool:
        return await ingested_count(pool, [org.id]) >= expected
    await eventually(done, timeout=45, what=f"{expected} messages ingested")
    assert await ingested_count(pool, [org.id]) == expected


async def test_ingest_never_opens_more_connections_to_a_server_than_its_profile_allows(
        settings: Settings, registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    async with CountingRelay(dovecot.host, dovecot.imap_port) as relay:
        await registry.add_profile(org, imap_profile(dovecot, name="limited", incoming_host="127.0.0.1",
                                                     incoming_port=relay.port, max_concurrent_connections=LIMIT))
        boxes = [await ready_mailbox(registry, org, dovecot, tracking="all", profile="limited") for _ in range(MAILBOXES)]

        # One-shot: every mailbox at once, two slots.
        _deliver(dovecot, boxes, 1)
        await run_service(IngestService(settings), burst=True)
        await _all_ingested(pool, org, MAILBOXES * PER_MAILBOX)
        assert relay.sessions >= MAILBOXES
        assert relay.peak == LIMIT, "at most the limit, and the limit used (so the count is no accident)"

        relay.reset_peak()
        async with ingest_running(settings) as ingest:
            _deliver(dovecot, boxes, 2)
            await _all_ingested(pool, org, 2 * MAILBOXES * PER_MAILBOX)
            assert relay.peak == LIMIT  # one idling, one for the others to poll through

            # The limit edited: each mailbox's runner stops and a new one starts once it has.
            old = {b.id: ingest.runners[b.id] for b in boxes}
            relay.reset_peak()
            await registry.update_profile(org, "limited", max_concurrent_connections=LIMIT + 1)

            async def all_renewed() -> bool:
                return all(ingest.runners.get(b.id) not in (None, old[b.id]) for b in boxes)
            # Every old runner has ended (a runner leaves ``runners`` only once its session closed),
            # so from here on only sessions under the new limit exist.  (Not asserted: while the old
            # sessions end, they and the new ones can add up to more than either limit, since the
            # new limit is a new count beside the old one.)
            await eventually(all_renewed, timeout=30, what="every mailbox in a session under the new limit")
            relay.reset_peak()
            _deliver(dovecot, boxes, 3)
            await _all_ingested(pool, org, 3 * MAILBOXES * PER_MAILBOX)
            assert relay.peak == LIMIT + 1  # two idling now, one for the others to poll through
