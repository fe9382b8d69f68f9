"""A held message moved into a folder that a folder-level tracking rule maps, against the real
PostgreSQL, Dovecot and broker: ingest announces it again from the mapped folder while evaluate holds
it, and once the mailbox may process email it is filed under the rule's record.  The newest event
takes the held event's place, whatever order the events are handled in, and the message keeps its
place in the hold order; an older event never takes a newer one's place.  Nothing lost, nothing
doubled."""
from __future__ import annotations

import asyncio
import imaplib
import json
import uuid

import asyncpg
import pytest

from services.evaluate import held
from services.evaluate.release import HeldMessageRelease
from services.evaluate.service import EvaluateService
from services.ingest.service import IngestService
from shared.consumer import Delivery
from shared.events.topics import EMAIL_RECEIVED
from shared.lifecycle import run_service
from shared.registry.service import Registry
from tests.support.cli import conduit_cli
from tests.support.mailboxes import ReadyMailbox, imap_profile, message, ready_mailbox
from tests.support.topics import read_topic

pytestmark = pytest.mark.peers


def _move(dovecot, box: ReadyMailbox, message_id: str, target: str, source: str = "INBOX") -> None:
    """What the user does in their mail client: one message moved into another folder."""
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=30) as imap:
        imap.login(box.email, box.password)
        imap.create(target)   # refused, harmlessly, when it is there already
        imap.select(source)
        typ, data = imap.uid("SEARCH", None, "HEADER", "Message-ID", f"<{message_id}>")
        assert typ == "OK" and data[0], (typ, data)
        typ, data = imap.uid("MOVE", data[0].decode(), target)
        assert typ == "OK", data
        imap.logout()


def _delivery(event: dict) -> Delivery:
    return Delivery(EMAIL_RECEIVED.envelope.model_validate(event), None)  # type: ignore[arg-type]


async def _decision(pool: asyncpg.Pool, box: ReadyMailbox, message_id: str) -> asyncpg.Record:
    async with pool.acquire() as conn:
        return await conn.fetchrow("SELECT * FROM email_decision WHERE mailbox_id = $1 AND message_id = $2",
                                   box.id, message_id)


async def _held_events(pool: asyncpg.Pool, box: ReadyMailbox) -> list[tuple[str, str]]:
    """(Message-ID, folder of the held event) of the mailbox's held messages, in the order held."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT message_id, event FROM held_message WHERE mailbox_id = $1 ORDER BY seq", box.id)
    return [(r["message_id"], json.loads(r["event"])["data"]["folder"] if isinstance(r["event"], str)
             else r["event"]["data"]["folder"]) for r in rows]


async def _activities(pool: asyncpg.Pool, org, message_id: str) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await conn.fetch("SELECT id, regarding_kind, regarding_id, correlated_by FROM email_activity "
                                "WHERE organization_id = $1 AND message_id = $2", org.id, message_id)


async def _set_up(registry: Registry, org, dovecot) -> tuple[ReadyMailbox, object]:
    """A mailbox tracking mail from known records, whose folder Acme is mapped to the account Acme."""
    await registry.add_profile(org, imap_profile(dovecot))
    acme = await registry.add_record(org, "account", "Acme", "info@acme.example")
    box = await ready_mailbox(registry, org, dovecot, tracking="known_records")
    await registry.add_folder_rule(org, box.email, "Acme", f"account:{acme.id}")
    return box, acme


@pytest.mark.parametrize("while_held", ["paused again", "before the next release"])
async def test_a_held_message_moved_into_a_mapped_folder_is_filed_under_the_rules_record_when_released(
        settings, registry: Registry, org, dovecot, pool, while_held: str) -> None:
    """Read from the Inbox, held (Test & Enable failed), enabled again, moved into Acme by the user:
    ingest announces it again from Acme.  That event reaches evaluate while the message is still
    held, because the mailbox was paused again before evaluate read it, or because it came between
    two looks of a running evaluate.  Released with the Inbox's event, it was decided "not tracked"
    (a stranger's mail) and never filed under Acme."""
    box, acme = await _set_up(registry, org, dovecot)
    mid = f"held-move-{uuid.uuid4().hex[:8]}@stranger.example"
    await dovecot.append(box.email, box.password, message("Order 31", sender="buyer@stranger.example",
                                                          message_id=f"<{mid}>"))
    await run_service(IngestService(settings), burst=True)
    await registry.record_test(box.id, "incoming", False, "the server refused the login")
    await run_service(EvaluateService(settings), burst=True)
    assert (await _decision(pool, box, mid))["held"]

    await registry.record_test(box.id, "incoming", True, "ok")
    await asyncio.to_thread(_move, dovecot, box, mid, "Acme")
    await run_service(IngestService(settings), burst=True)
    assert [e["data"]["folder"] for e in await read_topic(settings, "email.received", 2)] == ["INBOX", "Acme"]
    if while_held == "paused again":
        await registry.record_test(box.id, "incoming", False, "the server refused the login again")
        await run_service(EvaluateService(settings), burst=True)
        await registry.record_test(box.id, "incoming", True, "ok")
    else:
        async with held.releasing_alone(pool) as alone:   # another replica is releasing
            assert alone
            await run_service(EvaluateService(settings), burst=True)
    assert (await _decision(pool, box, mid))["held"]
    assert await _held_events(pool, box) == [(mid, "Acme")], "the held message keeps the Inbox's event"

    await run_service(EvaluateService(settings), burst=True)   # released

    [activity] = await _activities(pool, org, mid)
    assert (activity["regarding_kind"], activity["regarding_id"]) == ("account", acme.id)
    decision = await _decision(pool, box, mid)
    assert (decision["tracked"], decision["reason"], decision["held"]) == (True, "tracked_folder_rule", False), dict(decision)
    assert str(acme.id) in decision["explanation"]
    assert await _held_events(pool, box) == []
    code, out, err = await conduit_cli(settings, "message", "why", f"<{mid}>", "--org", org.name)
    assert code == 0 and f"{box.email}: tracked [tracked_folder_rule, rule folder_tracking]" in out, (out, err)
    created = await read_topic(settings, "activity.created", 1)
    assert [e["data"]["message_id"] for e in created] == [mid]


@pytest.mark.parametrize("batches", [
    "moved, then the Inbox's event redelivered",   # the older event after the newer one
    "both in one batch",
    "both in one batch, the newer first",
])
async def test_the_newest_event_of_a_held_message_is_evaluated_and_it_keeps_its_place(
        settings, registry: Registry, org, dovecot, pool, batches: str) -> None:
    """The message M is held, then a reply R to it; then M's move into Acme is announced.  Whatever
    order M's two events are handled in (a redelivery after a crash, a dead-letter replay, one batch),
    the held M has the newer event, Acme's, and is released before R, so R correlates to it."""
    box, acme = await _set_up(registry, org, dovecot)
    original = f"held-order-{uuid.uuid4().hex[:8]}@stranger.example"
    reply = f"held-reply-{uuid.uuid4().hex[:8]}@stranger.example"
    await dovecot.append(box.email, box.password, message("Order 32", sender="buyer@stranger.example",
                                                          message_id=f"<{original}>"))
    await run_service(IngestService(settings), burst=True)
    await dovecot.append(box.email, box.password, message("Re: Order 32", sender="carl@elsewhere.example",
                                                          message_id=f"<{reply}>", extra=f"In-Reply-To: <{original}>\r\n"))
    await run_service(IngestService(settings), burst=True)
    await asyncio.to_thread(_move, dovecot, box, original, "Acme")
    await run_service(IngestService(settings), burst=True)
    inbox, answer, moved = [_delivery(e) for e in await read_topic(settings, "email.received", 3)]
    assert [(d.event.data.message_id, d.event.data.folder) for d in (inbox, answer, moved)] == \
        [(original, "INBOX"), (reply, "INBOX"), (original, "Acme")]
    assert inbox.event.occurred_at < moved.event.occurred_at

    await registry.record_test(box.id, "incoming", False, "the server refused the login")
    evaluate = EvaluateService(settings)
    evaluate.pool = pool
    if batches == "moved, then the Inbox's event redelivered":
        for batch in ([inbox], [answer], [moved], [inbox]):
            await evaluate.handle(batch)
    elif batches == "both in one batch":
        await evaluate.handle([inbox, answer, moved])
    else:
        await evaluate.handle([inbox, answer])
        await evaluate.handle([moved, inbox])
    assert await _held_events(pool, box) == [(original, "Acme"), (reply, "INBOX")]

    await registry.record_test(box.id, "incoming", True, "ok")
    release = HeldMessageRelease(pool, evaluate.evaluate_again, batch=1, interval=60)   # one message a batch
    assert await release.release() == 2

    [filed] = await _activities(pool, org, original)
    assert (filed["regarding_kind"], filed["regarding_id"]) == ("account", acme.id)
    assert (await _decision(pool, box, original))["reason"] == "tracked_folder_rule"
    [correlated] = await _activities(pool, org, reply)
    assert correlated["correlated_by"] == "in_reply_to"
    assert (await _decision(pool, box, reply))["reason"] == "correlated_in_reply_to"
    assert await _held_events(pool, box) == []


async def test_a_move_announced_while_the_release_evaluates_the_held_event_is_not_lost(
        settings, registry: Registry, org, dovecot, pool) -> None:
    """A release reads the held Inbox event; before it commits, the consumer holds the message again
    with the move's newer event (the mailbox has held messages, so it waits behind them).  The
    release's commit decides the message from the Inbox event: the held move must stay, to be
    evaluated at the next look, not be let go with it."""
    box, acme = await _set_up(registry, org, dovecot)
    mid = f"held-race-{uuid.uuid4().hex[:8]}@stranger.example"
    await dovecot.append(box.email, box.password, message("Order 33", sender="buyer@stranger.example",
                                                          message_id=f"<{mid}>"))
    await run_service(IngestService(settings), burst=True)
    await asyncio.to_thread(_move, dovecot, box, mid, "Acme")
    await run_service(IngestService(settings), burst=True)
    inbox, moved = [_delivery(e) for e in await read_topic(settings, "email.received", 2)]

    evaluate = EvaluateService(settings)
    evaluate.pool = pool
    await registry.record_test(box.id, "incoming", False, "the server refused the login")
    await evaluate.handle([inbox])
    await registry.record_test(box.id, "incoming", True, "ok")
    await evaluate.handle([moved])   # held behind the held message: itself
    assert (await _decision(pool, box, mid))["reason"] == "behind_held_messages"
    # The release that had read the Inbox event commits now.
    await evaluate.evaluate_again([inbox], frozenset({(box.id, mid)}))
    assert await _activities(pool, org, mid) == []   # a stranger's mail from the Inbox: not tracked
    assert await _held_events(pool, box) == [(mid, "Acme")]

    release = HeldMessageRelease(pool, evaluate.evaluate_again, batch=10, interval=60)
    assert await release.release() == 1
    [activity] = await _activities(pool, org, mid)
    assert (activity["regarding_kind"], activity["regarding_id"]) == ("account", acme.id)
    assert (await _decision(pool, box, mid))["reason"] == "tracked_folder_rule"
    assert await _held_events(pool, box) == []
    assert await release.release() == 0


async def test_a_decided_message_moved_while_its_mailbox_is_paused_is_filed_once_it_may_process_email(
        settings, registry: Registry, org, dovecot, pool) -> None:
    """Decided "not tracked" from the Inbox; moved into Acme; ingest announces the move, and the
    mailbox is paused before evaluate reads it.  The move is held (the mailbox may not process
    email), not dropped because the message was decided before."""
    box, acme = await _set_up(registry, org, dovecot)
    mid = f"decided-move-{uuid.uuid4().hex[:8]}@stranger.example"
    await dovecot.append(box.email, box.password, message("Order 34", sender="buyer@stranger.example",
                                                          message_id=f"<{mid}>"))
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)
    assert (await _decision(pool, box, mid))["reason"] == "sender_unknown"

    await asyncio.to_thread(_move, dovecot, box, mid, "Acme")
    await run_service(IngestService(settings), burst=True)
    await registry.record_test(box.id, "incoming", False, "the server refused the login")
    await run_service(EvaluateService(settings), burst=True)
    assert await _held_events(pool, box) == [(mid, "Acme")]
    code, out, err = await conduit_cli(settings, "message", "why", f"<{mid}>", "--org", org.name)
    assert code == 0 and f"{box.email}: not tracked [sender_unknown" in out, (out, err)
    assert "A newer event of it (announced again, from another folder) is held since " in out, out
    assert "it will be evaluated when the mailbox may process email again" in out, out

    await registry.record_test(box.id, "incoming", True, "ok")
    await run_service(EvaluateService(settings), burst=True)
    [activity] = await _activities(pool, org, mid)
    assert (activity["regarding_kind"], activity["regarding_id"]) == ("account", acme.id)
    assert (await _decision(pool, box, mid))["reason"] == "tracked_folder_rule"
    assert await _held_events(pool, box) == []
