"""Held messages, against real PostgreSQL and the broker: a message evaluated while its mailbox may
not process email for now (incoming disabled, inactive, not approved) is held, explained by
`conduit message why`, and becomes exactly one activity once the mailbox may process email again,
in the order received; redeliveries, a second mailbox and a second consumer never make a second one;
a deliberate setting (queue conversion off) stays a final decision."""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from uuid import UUID

import asyncpg
from prometheus_client import REGISTRY

from services.evaluate import held
from services.evaluate.service import EvaluateService
from services.evaluate.settings import EvaluateSettings
from shared.events.envelope import Envelope
from shared.events.payloads import EmailReceivedV1
from shared.kafka import Publisher
from shared.lifecycle import run_service
from shared.mime import message_key
from shared.rawstore import store_raw
from shared.registry.models import Organization
from shared.registry.service import ProfileInput, Registry
from shared.settings import Settings
from tests.support.cli import conduit_cli
from tests.support.mailboxes import message
from tests.support.topics import read_topic
from tests.support.waiting import eventually

WAITING = "it will be evaluated when the mailbox may process email again"


async def _mailbox(registry: Registry, org: Organization, *, owner: str = "user", tracking: str = "all",
                   **settings) -> tuple[UUID, str]:
    """A mailbox that may process email (approved, incoming enabled); evaluate needs no mail server."""
    if not await registry.profiles(org):
        await registry.add_profile(org, ProfileInput(name="imap", server_type="imap", incoming_host="127.0.0.1",
                                                     incoming_port=993))
    email = f"{owner}-{uuid.uuid4().hex[:8]}@example.com"
    if owner == "user":
        await registry.add_user(org, f"User {email}", email)
    elif owner == "queue":
        await registry.add_queue(org, f"Queue {email}", email)
    else:
        await registry.add_forward_mailbox(org, "Forward", email)
    box = await registry.update_mailbox(org, email, email_approved=True, tracking=tracking, **settings)
    await registry.record_test(box.id, "incoming", True, "ok")
    return box.id, email


async def _received(pool: asyncpg.Pool, publisher: Publisher, org: Organization, mailbox_id: UUID, raw: bytes,
                    event: Envelope | None = None, *, forwarded_by: str | None = None) -> Envelope:
    """What ingest does for one message: the raw MIME stored, then `email.received` published (again,
    when ``event`` is given: the broker delivering the same event twice)."""
    async with pool.acquire() as conn:
        await store_raw(conn, [raw])
    event = event or Envelope[EmailReceivedV1](
        type="email.received", schema_version=1, producer="tests", organization_id=org.id,
        data=EmailReceivedV1(mailbox_id=mailbox_id, source="imap", uid=1, size=len(raw),
                             raw_sha256=hashlib.sha256(raw).hexdigest(), message_id=message_key(raw),
                             forwarded_by=forwarded_by))
    await publisher.publish("email.received", event, str(mailbox_id))
    return event


async def _evaluate(settings: Settings, group: str | None = None) -> EvaluateService:
    """One burst run of evaluate: held messages released, the topic consumed, held messages released."""
    service = EvaluateService(settings, evaluate_settings=EvaluateSettings(group_id=group) if group else None)
    await run_service(service, burst=True)
    return service


async def _decisions(pool: asyncpg.Pool, org: Organization, message_id: str) -> dict[UUID, asyncpg.Record]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM email_decision WHERE organization_id = $1 AND message_id = $2",
                                org.id, message_id)
    return {r["mailbox_id"]: r for r in rows}


async def _activities(pool: asyncpg.Pool, org: Organization, message_id: str) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await conn.fetch(
            """SELECT a.id, a.correlated_by, array_agg(am.mailbox_id) FILTER (WHERE am.mailbox_id IS NOT NULL) AS mailboxes
               FROM email_activity a LEFT JOIN email_activity_mailbox am ON am.activity_id = a.id
               WHERE a.organization_id = $1 AND a.message_id = $2 GROUP BY a.id""", org.id, message_id)


def _assert_held(decision: asyncpg.Record, reason: str) -> None:
    """Held, not decided: the guard's reason, an explanation that says it waits, no activity."""
    assert (decision["reason"], decision["explanation"][:5]) == (reason, "Held:"), dict(decision)
    assert decision["held"] and not decision["tracked"] and decision["activity_id"] is None


def _assert_decided(decision: asyncpg.Record, reason: str, *, tracked: bool) -> None:
    assert (decision["reason"], decision["tracked"]) == (reason, tracked), dict(decision)
    assert not decision["held"] and not decision["explanation"].startswith("Held:")


async def _held_rows(pool: asyncpg.Pool, org: Organization) -> int:
    async with pool.acquire() as conn:
        return await conn.fetchval("SELECT count(*) FROM held_message WHERE organization_id = $1", org.id)


async def _why(settings: Settings, org: Organization, message_id: str, *args: str) -> str:
    code, out, err = await conduit_cli(settings, "message", "why", f"<{message_id}>", "--org", org.name, *args)
    assert code == 0, (out, err)
    return out


async def _created_events(settings: Settings, message_id: str) -> int:
    events = await read_topic(settings, "activity.created", 1)
    return sum(1 for e in events if e["data"]["message_id"] == message_id)


async def test_a_message_for_a_mailbox_with_incoming_disabled_is_held_then_tracked_once_enabled(
        settings: Settings, registry: Registry, org: Organization, pool: asyncpg.Pool, publisher: Publisher) -> None:
    box, email = await _mailbox(registry, org)
    raw = message("Quote for the spring order", to=email)
    key = message_key(raw)
    await _received(pool, publisher, org, box, raw)
    await registry.record_test(box, "incoming", False, "the server refused the login")   # a Test & Enable re-run failed

    await _evaluate(settings)
    assert await _activities(pool, org, key) == []
    _assert_held((await _decisions(pool, org, key))[box], "incoming_disabled")
    out = await _why(settings, org, key)
    assert f"{email}: held since " in out and "[incoming_disabled, rule incoming_disabled]" in out, out
    assert "incoming email synchronization is disabled for this mailbox" in out and WAITING in out, out
    [as_json] = json.loads(await _why(settings, org, key, "--json"))
    assert as_json["held"] is True and as_json["held_since"] and as_json["reason"] == "incoming_disabled"
    code, out, err = await conduit_cli(settings, "mailbox", "show", email, "--org", org.name)
    assert code == 0 and re.search(r"^held +1 message\(s\) since .*\(incoming_disabled\)", out, re.M), (out, err)

    await registry.record_test(box, "incoming", True, "ok")   # enabled again
    counted = REGISTRY.get_sample_value("conduit_held_messages_released_total") or 0
    run = await _evaluate(settings)
    assert run.release is not None and run.release.released == 1
    assert REGISTRY.get_sample_value("conduit_held_messages_released_total") == counted + 1
    [activity] = await _activities(pool, org, key)
    assert activity["mailboxes"] == [box]
    decision = (await _decisions(pool, org, key))[box]
    _assert_decided(decision, "tracked_all", tracked=True)
    assert decision["activity_id"] == activity["id"]
    assert await _held_rows(pool, org) == 0
    out = await _why(settings, org, key)
    assert f"{email}: tracked [tracked_all, rule track_all]" in out and "held" not in out, out
    assert await _created_events(settings, key) == 1
    assert (await registry.mailbox(org, email, sync=True)).sync.held == 0


async def test_a_held_message_redelivered_while_held_and_while_released_becomes_one_activity(
        settings: Settings, registry: Registry, org: Organization, pool: asyncpg.Pool, publisher: Publisher) -> None:
    box, email = await _mailbox(registry, org)
    raw = message("Delivered three times", to=email)
    key = message_key(raw)
    await registry.update_mailbox(org, email, active=False)   # an administrator's toggle
    event = await _received(pool, publisher, org, box, raw)
    await _evaluate(settings)
    first = (await _decisions(pool, org, key))[box]
    _assert_held(first, "mailbox_inactive")

    # Redelivered while held: still held, since the first time, and still no activity.
    await _received(pool, publisher, org, box, raw, event)
    await _evaluate(settings)
    again = (await _decisions(pool, org, key))[box]
    _assert_held(again, "mailbox_inactive")
    assert again["decided_at"] == first["decided_at"]
    assert await _activities(pool, org, key) == [] and await _held_rows(pool, org) == 1

    # Active again, and redelivered once more while it is being released: this group's run releases
    # it and consumes the redelivery, while a second group (a zombie replica, say) consumes all three
    # copies at the same time.
    await registry.update_mailbox(org, email, active=True)
    await _received(pool, publisher, org, box, raw, event)
    ours, zombie = await asyncio.gather(_evaluate(settings), _evaluate(settings, group=f"zombie-{uuid.uuid4().hex[:8]}"))
    assert ours.consumer is not None and ours.consumer.processed == 1
    assert zombie.consumer is not None and zombie.consumer.processed == 3
    assert ours.release is not None and zombie.release is not None
    assert ours.release.released + zombie.release.released == 1

    [activity] = await _activities(pool, org, key)
    assert activity["mailboxes"] == [box]
    decision = (await _decisions(pool, org, key))[box]
    _assert_decided(decision, "tracked_all", tracked=True)
    assert decision["activity_id"] == activity["id"]
    assert await _held_rows(pool, org) == 0
    assert await _created_events(settings, key) == 1


async def test_queue_conversion_off_is_decided_not_held(
        settings: Settings, registry: Registry, org: Organization, pool: asyncpg.Pool, publisher: Publisher) -> None:
    box, email = await _mailbox(registry, org, owner="queue", convert_to_activities=False)
    # Held for a passing state, it is decided by the deliberate setting once the mailbox may process email.
    paused = message("While incoming was disabled", to=email)
    await registry.record_test(box, "incoming", False, "refused")
    await _received(pool, publisher, org, box, paused)
    await _evaluate(settings)
    _assert_held((await _decisions(pool, org, message_key(paused)))[box], "incoming_disabled")
    await registry.record_test(box, "incoming", True, "ok")
    await _evaluate(settings)
    _assert_decided((await _decisions(pool, org, message_key(paused)))[box], "queue_conversion_off", tracked=False)
    assert await _held_rows(pool, org) == 0

    # While the mailbox may process email, conversion off is decided at once, and for good.
    plain = message("To a queue that does not convert", to=email)
    await _received(pool, publisher, org, box, plain)
    await _evaluate(settings)
    _assert_decided((await _decisions(pool, org, message_key(plain)))[box], "queue_conversion_off", tracked=False)
    assert f"{email}: not tracked [queue_conversion_off" in await _why(settings, org, message_key(plain))
    assert await _held_rows(pool, org) == 0
    assert await _activities(pool, org, message_key(paused)) == []
    assert await _activities(pool, org, message_key(plain)) == []


async def test_a_message_held_in_two_mailboxes_becomes_one_activity_linked_to_both(
        settings: Settings, registry: Registry, org: Organization, pool: asyncpg.Pool, publisher: Publisher) -> None:
    ann, ann_email = await _mailbox(registry, org)
    bob, bob_email = await _mailbox(registry, org)
    raw = message("To both of us", to=f"{ann_email}, {bob_email}")
    key = message_key(raw)
    await registry.record_test(ann, "incoming", False, "refused")
    await registry.update_mailbox(org, bob_email, email_approved=False)
    await _received(pool, publisher, org, ann, raw)
    await _received(pool, publisher, org, bob, raw)
    await _evaluate(settings)
    decisions = await _decisions(pool, org, key)
    _assert_held(decisions[ann], "incoming_disabled")
    _assert_held(decisions[bob], "mailbox_not_approved")

    await registry.record_test(ann, "incoming", True, "ok")
    await _evaluate(settings)
    [activity] = await _activities(pool, org, key)
    assert activity["mailboxes"] == [ann]
    _assert_held((await _decisions(pool, org, key))[bob], "mailbox_not_approved")

    await registry.update_mailbox(org, bob_email, email_approved=True)
    await _evaluate(settings)
    [activity] = await _activities(pool, org, key)
    assert sorted(activity["mailboxes"]) == sorted([ann, bob])
    decisions = await _decisions(pool, org, key)
    _assert_decided(decisions[ann], "tracked_all", tracked=True)
    _assert_decided(decisions[bob], "already_tracked", tracked=True)
    assert decisions[ann]["activity_id"] == decisions[bob]["activity_id"] == activity["id"]
    assert await _created_events(settings, key) == 1


async def test_newer_mail_waits_behind_held_mail_so_a_reply_correlates(
        settings: Settings, registry: Registry, org: Organization, pool: asyncpg.Pool, publisher: Publisher) -> None:
    """Released in the order received: a reply evaluated before the message it answers would find
    nothing to correlate to, and be lost to the CRM."""
    box, email = await _mailbox(registry, org, tracking="known_records")
    await registry.add_record(org, "contact", "Bea", "bea@customer.example")
    original = message("Order 17", sender="bea@customer.example", to=email)
    reply = message("Re: Order 17", sender="carl@elsewhere.example", to=email,
                    extra=f"In-Reply-To: <{message_key(original)}>\r\n")
    await registry.record_test(box, "incoming", False, "refused")
    await _received(pool, publisher, org, box, original)
    await _evaluate(settings)
    _assert_held((await _decisions(pool, org, message_key(original)))[box], "incoming_disabled")

    # Enabled again; the reply arrives while another replica is releasing: it waits behind the original.
    await registry.record_test(box, "incoming", True, "ok")
    await _received(pool, publisher, org, box, reply)
    from services.evaluate.held import releasing_alone

    async with releasing_alone(pool) as alone:
        assert alone
        await _evaluate(settings)
    _assert_held((await _decisions(pool, org, message_key(reply)))[box], "behind_held_messages")
    assert "older messages of this mailbox are held" in await _why(settings, org, message_key(reply))

    await _evaluate(settings)
    [tracked] = await _activities(pool, org, message_key(original))
    [correlated] = await _activities(pool, org, message_key(reply))
    _assert_decided((await _decisions(pool, org, message_key(original)))[box], "sender_known_record", tracked=True)
    _assert_decided((await _decisions(pool, org, message_key(reply)))[box], "correlated_in_reply_to", tracked=True)
    assert correlated["correlated_by"] == "in_reply_to" and tracked["id"] != correlated["id"]
    assert await _held_rows(pool, org) == 0



async def test_messages_forwarded_for_an_unapproved_mailbox_are_held_then_tracked_once_each(
        settings: Settings, registry: Registry, org: Organization, pool: asyncpg.Pool, publisher: Publisher) -> None:
    """A forward carrying two messages, for a user whose own mailbox is not approved yet: both attached
    messages are held for that mailbox (sharing the forward's event), the forward's own decision is
    final, and approval releases each attached message once."""
    forward_box, forward_email = await _mailbox(registry, org, owner="forward")
    fran = f"fran-{uuid.uuid4().hex[:8]}@example.com"
    user = await registry.add_user(org, "Fran", fran, incoming="forward_mailbox")
    await registry.update_mailbox(org, fran, tracking="all")   # not approved
    inner = [message(f"Attached {n}", to=fran) for n in range(2)]
    outer = (f"From: {fran}\r\nTo: {forward_email}\r\nSubject: Fwd: two\r\nMessage-ID: <{uuid.uuid4().hex}@example.com>\r\n"
             "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n").encode() + b"".join(
        b"--b1\r\nContent-Type: message/rfc822\r\n\r\n" + raw + b"\r\n" for raw in inner) + b"--b1--\r\n"
    await _received(pool, publisher, org, forward_box, outer, forwarded_by=fran)
    await _evaluate(settings)
    for raw in inner:
        _assert_held((await _decisions(pool, org, message_key(raw)))[user.mailbox_id], "mailbox_not_approved")
    _assert_decided((await _decisions(pool, org, message_key(outer)))[forward_box], "forwarded_messages_extracted",
                    tracked=False)

    def counted(tracked: str, reason: str) -> float:
        return REGISTRY.get_sample_value("conduit_decisions_total", {"tracked": tracked, "reason": reason}) or 0

    extracted, tracked_all = counted("false", "forwarded_messages_extracted"), counted("true", "tracked_all")
    await registry.update_mailbox(org, fran, email_approved=True)
    run = await _evaluate(settings)
    assert run.release is not None and run.release.released == 2
    # The forward's own decision was counted when it was made, not again when its messages are released.
    assert (counted("false", "forwarded_messages_extracted"), counted("true", "tracked_all")) == (extracted, tracked_all + 2)
    for raw in inner:
        [activity] = await _activities(pool, org, message_key(raw))
        assert activity["mailboxes"] == [user.mailbox_id]
        _assert_decided((await _decisions(pool, org, message_key(raw)))[user.mailbox_id], "tracked_all", tracked=True)
    assert await _activities(pool, org, message_key(outer)) == []
    assert await _held_rows(pool, org) == 0


async def test_a_running_evaluate_releases_held_messages_at_its_next_look(
        settings: Settings, registry: Registry, org: Organization, pool: asyncpg.Pool, publisher: Publisher) -> None:
    """Long-lived, evaluate looks for releasable held messages every CONDUIT_EVALUATE_RELEASE_SECONDS:
    nothing else has to happen (no new mail, no other service) for a held message to be tracked."""
    box, email = await _mailbox(registry, org)
    raw = message("Waiting for the mailbox", to=email)
    key = message_key(raw)
    await registry.record_test(box, "incoming", False, "refused")
    await _received(pool, publisher, org, box, raw)

    async def decision() -> asyncpg.Record | None:
        return (await _decisions(pool, org, key)).get(box)

    stopping = asyncio.Event()
    service = EvaluateService(settings, evaluate_settings=EvaluateSettings(release_seconds=0.2, health_aggregate=False))
    running = asyncio.create_task(run_service(service, stopping=stopping))
    try:
        _assert_held(await eventually(decision, what="a decision"), "incoming_disabled")
        await registry.record_test(box, "incoming", True, "ok")
        [activity] = await eventually(lambda: _activities(pool, org, key), what="the held message tracked")
    finally:
        stopping.set()
        await running
    _assert_decided(await decision(), "tracked_all", tracked=True)
    assert activity["mailboxes"] == [box]
    assert service.release is not None and service.release.released == 1


async def _burst(settings: Settings, **own) -> EvaluateService:
    service = EvaluateService(settings, evaluate_settings=EvaluateSettings(**own))
    await run_service(service, burst=True)
    return service


async def test_a_held_message_whose_forwarder_changed_is_decided_and_holds_up_no_one(
        settings: Settings, registry: Registry, org: Organization, pool: asyncpg.Pool, publisher: Publisher) -> None:
    """Held for Fran's mailbox (not approved); then Fran's address changes, and her mailbox is
    approved.  Evaluated again, the forward no longer belongs to her: her held decision becomes a
    final one, and the held messages behind it, of another mailbox, are released too."""
    forward_box, forward_email = await _mailbox(registry, org, owner="forward")
    fran = f"fran-{uuid.uuid4().hex[:8]}@example.com"
    user = await registry.add_user(org, "Fran", fran, incoming="forward_mailbox")
    await registry.update_mailbox(org, fran, tracking="all")   # not approved
    fwd = message("Fwd: inline", sender=fran, to=forward_email)
    await _received(pool, publisher, org, forward_box, fwd, forwarded_by=fran)
    await _burst(settings, release_batch=1)
    _assert_held((await _decisions(pool, org, message_key(fwd)))[user.mailbox_id], "mailbox_not_approved")

    box, email = await _mailbox(registry, org)
    other = message("Other mailbox", to=email)
    await registry.record_test(box, "incoming", False, "refused")
    await _received(pool, publisher, org, box, other)
    await _burst(settings, release_batch=1)
    _assert_held((await _decisions(pool, org, message_key(other)))[box], "incoming_disabled")

    async with pool.acquire() as conn:
        await conn.execute("UPDATE crm_user SET email = $2 WHERE id = $1", user.id, f"renamed-{fran}")
        await conn.execute("UPDATE mailbox SET email_approved = true WHERE id = $1", user.mailbox_id)
    await registry.record_test(box, "incoming", True, "ok")
    await _burst(settings, release_batch=1)
    decided = await _decisions(pool, org, message_key(fwd))
    _assert_decided(decided[user.mailbox_id], "no_longer_for_this_mailbox", tracked=False)
    _assert_decided(decided[forward_box], "forwarder_unknown", tracked=False)
    _assert_decided((await _decisions(pool, org, message_key(other)))[box], "tracked_all", tracked=True)
    assert await _held_rows(pool, org) == 0


async def test_mail_forwarded_while_its_forwarder_is_inactive_is_held_then_tracked(
        settings: Settings, registry: Registry, org: Organization, pool: asyncpg.Pool, publisher: Publisher) -> None:
    forward_box, forward_email = await _mailbox(registry, org, owner="forward")
    gil = f"gil-{uuid.uuid4().hex[:8]}@example.com"
    user = await registry.add_user(org, "Gil", gil, incoming="forward_mailbox")
    await registry.update_mailbox(org, gil, tracking="all", email_approved=True)
    async with pool.acquire() as conn:
        await conn.execute("UPDATE crm_user SET active = false WHERE id = $1", user.id)   # deactivated for a minute
    fwd = message("Fwd: while inactive", sender=gil, to=forward_email)
    await _received(pool, publisher, org, forward_box, fwd, forwarded_by=gil)
    await _burst(settings)
    _assert_held((await _decisions(pool, org, message_key(fwd)))[user.mailbox_id], "mailbox_inactive")
    assert await _activities(pool, org, message_key(fwd)) == []
    async with pool.acquire() as conn:
        await conn.execute("UPDATE crm_user SET active = true WHERE id = $1", user.id)
    await _burst(settings)
    _assert_decided((await _decisions(pool, org, message_key(fwd)))[user.mailbox_id], "tracked_all", tracked=True)
    assert len(await _activities(pool, org, message_key(fwd))) == 1


async def test_a_users_held_own_mail_does_not_hold_the_mail_they_forward(
        settings: Settings, registry: Registry, org: Organization, pool: asyncpg.Pool, publisher: Publisher) -> None:
    """Hal's own mail is held (incoming disabled), then Hal moves to delivery through the forward
    mailbox: the mail Hal forwards reads other settings, and does not wait behind the held mail."""
    forward_box, forward_email = await _mailbox(registry, org, owner="forward")
    box, hal = await _mailbox(registry, org)
    await registry.record_test(box, "incoming", False, "refused")
    direct = message("Direct, ingested before the switch", to=hal)
    await _received(pool, publisher, org, box, direct)
    await _burst(settings)
    _assert_held((await _decisions(pool, org, message_key(direct)))[box], "incoming_disabled")
    async with pool.acquire() as conn:
        await conn.execute("UPDATE crm_user SET incoming_method = 'forward_mailbox' WHERE lower(email) = lower($1)", hal)
    fwd = message("Fwd: after the switch", sender=hal, to=forward_email)
    await _received(pool, publisher, org, forward_box, fwd, forwarded_by=hal)
    async with held.releasing_alone(pool) as alone:      # as between two looks of a running evaluate
        assert alone
        await _burst(settings)
    _assert_decided((await _decisions(pool, org, message_key(fwd)))[box], "tracked_all", tracked=True)
