"""The order of folder-rule filings, and what an untracked decision may become later; found by a
review of the re-filing change.  Against the real PostgreSQL, Dovecot and broker; evaluate's batches
are handled directly, in the order a crash, a redelivery or a rebalance can give them.

- A folder rule's event handled again, or late (redelivered after a crash before the offset commit,
  finished by a replica that lost the partition, replayed from the dead letters), must not undo a
  newer filing: decisions and regarding records follow the events' publication order.
- A decision "not tracked" stands when another mailbox makes the message an activity days later (a
  queue must not delete mail it kept); only a decision made at the same moment is linked."""
from __future__ import annotations

import asyncio
import imaplib

import pytest

from services.evaluate.service import EvaluateService
from services.ingest.service import IngestService
from shared.consumer import Delivery
from shared.events.topics import EMAIL_RECEIVED
from shared.lifecycle import run_service
from shared.registry.service import Registry
from tests.support.mailboxes import imap_profile, message, ready_mailbox
from tests.support.topics import read_topic

pytestmark = pytest.mark.peers


async def _regarding(pool, org, message_id):
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT regarding_kind, regarding_id FROM email_activity "
                                  "WHERE organization_id = $1 AND message_id = $2", org.id, message_id)
    return (row["regarding_kind"], row["regarding_id"]) if row else None


def _delivery(event: dict) -> Delivery:
    return Delivery(EMAIL_RECEIVED.envelope.model_validate(event), None)  # type: ignore[arg-type]


def _move_all(dovecot, box, source: str, target: str) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=30) as imap:
        imap.login(box.email, box.password)
        imap.create(target)
        imap.select(source)
        typ, data = imap.uid("MOVE", "1:*", target)
        assert typ == "OK", data
        imap.logout()


async def test_a_redelivered_folder_event_does_not_undo_another_mailboxs_later_filing(
        settings, registry: Registry, org, dovecot, pool) -> None:
    """Two mailboxes file one message under different records: the later filing wins.  Ann's batch
    commits, her replica dies before the offset commit, Bob's later event files the activity under
    Beta; Ann's batch redelivered flipped it back to Acme (and published activity.updated)."""
    await registry.add_profile(org, imap_profile(dovecot))
    acme = await registry.add_record(org, "account", "Acme", "info@acme.example")
    beta = await registry.add_record(org, "account", "Beta", "info@beta.example")
    ann = await ready_mailbox(registry, org, dovecot, tracking="known_records")
    bob = await ready_mailbox(registry, org, dovecot, tracking="known_records")
    await registry.add_folder_rule(org, ann.email, "Customers", f"account:{acme.id}")
    await registry.add_folder_rule(org, bob.email, "Customers", f"account:{beta.id}")
    shared = message("Order 99", sender="buyer@stranger.example", message_id="<replay-1@stranger.example>")
    # Read one after the other, so Bob's event is the later one (one run reads them in no fixed order).
    await dovecot.append(ann.email, ann.password, shared, folder="Customers")
    await run_service(IngestService(settings), burst=True)
    await dovecot.append(bob.email, bob.password, shared, folder="Customers")
    await run_service(IngestService(settings), burst=True)
    events = {e["data"]["mailbox_id"]: _delivery(e) for e in await read_topic(settings, "email.received", 2)}
    assert events[str(ann.id)].event.occurred_at < events[str(bob.id)].event.occurred_at

    evaluate = EvaluateService(settings)
    evaluate.pool = pool
    await evaluate.handle([events[str(ann.id)]])
    await evaluate.handle([events[str(bob.id)]])
    assert await _regarding(pool, org, "replay-1@stranger.example") == ("account", beta.id)   # Bob read last
    await evaluate.handle([events[str(ann.id)]])   # the same event again: at-least-once redelivery
    after = await _regarding(pool, org, "replay-1@stranger.example")
    async with pool.acquire() as conn:
        updated = await conn.fetchval("SELECT count(*) FROM event_outbox o, jsonb_array_elements(CASE WHEN o.topic = '' THEN o.payload ELSE '[]'::jsonb END) e "
                                      "WHERE e->>'topic' = 'activity.updated' AND e->'event'->>'organization_id' = $1", str(org.id))
    assert after == ("account", beta.id), "a redelivered event changed the filing"
    assert updated == 1, "one activity.updated: Bob's filing, not the redelivery"


@pytest.mark.parametrize("late", ["alone", "in the newer one's batch"])
async def test_an_old_event_handled_late_does_not_file_the_message_back_under_a_folder_it_left(
        settings, registry: Registry, org, dovecot, pool, late: str) -> None:
    """One mailbox: read in Acme, then moved to Beta (announced again).  The Acme event handled after
    the Beta one (a batch finishing on a replica that lost its partition while the new owner handled
    both) filed it back under Acme, while it sits in Beta."""
    await registry.add_profile(org, imap_profile(dovecot))
    acme = await registry.add_record(org, "account", "Acme", "info@acme.example")
    beta = await registry.add_record(org, "account", "Beta", "info@beta.example")
    ann = await ready_mailbox(registry, org, dovecot, tracking="known_records")
    await registry.add_folder_rule(org, ann.email, "Acme", f"account:{acme.id}")
    await registry.add_folder_rule(org, ann.email, "Beta", f"account:{beta.id}")
    await dovecot.append(ann.email, ann.password, message("Order 98", sender="buyer@stranger.example",
                                                          message_id="<late-1@stranger.example>"), folder="Acme")
    await run_service(IngestService(settings), burst=True)
    await asyncio.to_thread(_move_all, dovecot, ann, "Acme", "Beta")
    await run_service(IngestService(settings), burst=True)
    events = [_delivery(e) for e in await read_topic(settings, "email.received", 2)]
    assert [d.event.data.folder for d in events] == ["Acme", "Beta"]

    evaluate = EvaluateService(settings)
    evaluate.pool = pool
    await evaluate.handle([events[0]])
    if late == "alone":
        await evaluate.handle([events[1]])
        assert await _regarding(pool, org, "late-1@stranger.example") == ("account", beta.id)
        await evaluate.handle([events[0]])   # the zombie batch's commit lands last
    else:
        await evaluate.handle([events[1], events[0]])   # replayed from the dead letters behind the newer one
    after = await _regarding(pool, org, "late-1@stranger.example")
    decisions = await registry.decisions(org, "late-1@stranger.example")
    assert after == ("account", beta.id), "the message is in Beta, the activity regards Acme"
    assert str(beta.id) in decisions[0].explanation, decisions[0].explanation


async def test_a_decision_made_days_before_an_activity_stands_and_a_queue_keeps_the_mail(
        settings, registry: Registry, org, dovecot, pool) -> None:
    """The queue decided "not tracked" (the message stays on its server); days later another mailbox
    makes the message an activity.  The queue's decision stands (first decision wins), so its next
    session does not delete the message."""
    await registry.add_profile(org, imap_profile(dovecot))
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", tracking="known_records",
                                delete_after_processing=True)
    user = await ready_mailbox(registry, org, dovecot, tracking="all")
    shared = message("Order 97", sender="buyer@stranger.example", message_id="<later-1@stranger.example>")
    dovecot.deliver(queue.email, shared)
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)
    await run_service(IngestService(settings), burst=True)
    before = {d.mailbox_id: (d.tracked, d.reason) for d in await registry.decisions(org, "later-1@stranger.example")}
    assert before[queue.id][0] is False and dovecot.message_count(queue.email) == 1

    async with pool.acquire() as conn:   # "days" pass
        await conn.execute("UPDATE email_decision SET decided_at = decided_at - interval '3 days' "
                           "WHERE mailbox_id = $1", queue.id)
    dovecot.deliver(user.email, shared)
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)
    await run_service(IngestService(settings), burst=True)
    after = {d.mailbox_id: d for d in await registry.decisions(org, "later-1@stranger.example")}
    assert (after[queue.id].tracked, after[queue.id].reason) == before[queue.id]
    assert dovecot.message_count(queue.email) == 1
