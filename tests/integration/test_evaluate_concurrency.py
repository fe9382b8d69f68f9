"""Two evaluate replicas decide one message for two mailboxes at the same moment (its events are keyed
by mailbox, so they go to different partitions, often to different replicas).  Neither sees the
other's activity when it decides: the mailbox whose tracking option says "not tracked" must still end
*already tracked* and linked to the activity, as it would have been evaluated after the other.
Against the real PostgreSQL, Dovecot and broker; the two batches are held at the point where both
have read what is tracked, before either records."""
from __future__ import annotations

import asyncio

import pytest

from services.evaluate import repository
from services.evaluate.service import EvaluateService
from services.ingest.service import IngestService
from shared.consumer import Delivery
from shared.events.topics import EMAIL_RECEIVED
from shared.lifecycle import run_service
from shared.registry.service import Registry
from tests.support.mailboxes import imap_profile, message, ready_mailbox
from tests.support.topics import read_topic

pytestmark = pytest.mark.peers


async def test_a_message_decided_at_once_for_two_mailboxes_is_linked_to_both(
        settings, registry: Registry, org, dovecot, pool, monkeypatch) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    ann = await ready_mailbox(registry, org, dovecot, tracking="all")              # tracks it
    bob = await ready_mailbox(registry, org, dovecot, tracking="known_records")    # a stranger's: would not
    shared = message("Order 22", sender="buyer@stranger.example", message_id="<at-once-1@stranger.example>")
    dovecot.deliver(ann.email, shared)
    dovecot.deliver(bob.email, shared)
    await run_service(IngestService(settings), burst=True)
    events = {e["data"]["mailbox_id"]: Delivery(EMAIL_RECEIVED.envelope.model_validate(e), None)  # type: ignore[arg-type]
              for e in await read_topic(settings, "email.received", 2)}

    loaded = 0
    both_loaded = asyncio.Event()
    original = repository.load_lookups

    async def load_then_wait(*args, **kwargs):
        nonlocal loaded
        lookups = await original(*args, **kwargs)
        loaded += 1
        if loaded == 2:
            both_loaded.set()
        await asyncio.wait_for(both_loaded.wait(), 30)   # each decides on what it read before either records
        return lookups

    monkeypatch.setattr(repository, "load_lookups", load_then_wait)
    replicas = [EvaluateService(settings), EvaluateService(settings)]
    for replica in replicas:
        replica.pool = pool
    await asyncio.gather(replicas[0].handle([events[str(ann.id)]]), replicas[1].handle([events[str(bob.id)]]))

    decisions = {d.mailbox_id: d for d in await registry.decisions(org, "at-once-1@stranger.example")}
    assert decisions[ann.id].reason == "tracked_all"
    assert (decisions[bob.id].tracked, decisions[bob.id].reason) == (True, "already_tracked"), decisions[bob.id]
    assert decisions[bob.id].activity_id == decisions[ann.id].activity_id is not None
    async with pool.acquire() as conn:
        linked = await conn.fetch("SELECT mailbox_id FROM email_activity_mailbox WHERE activity_id = $1",
                                  decisions[ann.id].activity_id)
    assert {r["mailbox_id"] for r in linked} == {ann.id, bob.id}
