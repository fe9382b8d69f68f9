"""What `activity.created` tells a CRM subscriber beyond the addresses, as the reference's email entity
holds it: the activity a reply was correlated to (`correlated_activity_id`, stored in
``email_activity.correlated_activity_id`` too), the Bcc recipients, the tracking token, and when the
email itself was received (incoming) or sent (outgoing).

Against Dovecot, ingest and evaluate (burst mode), a dispatch sending to an aiosmtpd capture server,
the broker and PostgreSQL."""
from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from conduit.peers.smtp import CaptureSmtpServer
from services.evaluate import repository as repo
from services.evaluate.service import EvaluateService
from services.ingest.service import IngestService
from shared.kafka import Publisher
from shared.lifecycle import run_service
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.dispatch import dispatch, finals, outbound, publish, sending_mailbox
from tests.support.mailboxes import imap_profile, message, ready_mailbox
from tests.support.topics import read_topic

pytestmark = pytest.mark.peers

BUYER = "buyer@customer.example"
DATE_HEADER = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)   # tests.support.mailboxes.message's Date


async def _ingest_and_evaluate(settings: Settings) -> None:
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)


async def _created(settings: Settings, org, expected: int) -> dict[str, dict]:
    """The test organization's `activity.created` payloads, by Message-ID."""
    events = [e for e in await read_topic(settings, "activity.created", expected) if e["organization_id"] == str(org.id)]
    return {e["data"]["message_id"]: e["data"] for e in events}


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


async def test_a_reply_carries_the_activity_it_was_correlated_to(
        settings: Settings, registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    """By In-Reply-To, to an email tracked in an earlier batch (found in PostgreSQL) and to one of the
    same batch (the id evaluate has just given it)."""
    tag = uuid.uuid4().hex[:8]
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, tracking="all")
    first, reply = f"first-{tag}@customer.example", f"reply-{tag}@customer.example"
    dovecot.deliver(box.email, message("Quote", sender=BUYER, to=box.email, message_id=f"<{first}>"))
    await _ingest_and_evaluate(settings)
    dovecot.deliver(box.email, message("Something else", sender=BUYER, to=box.email, message_id=f"<{reply}>",
                                       extra=f"In-Reply-To: <{first}>\r\n"))
    together, answer = f"together-{tag}@customer.example", f"answer-{tag}@customer.example"
    dovecot.deliver(box.email, message("Order", sender=BUYER, to=box.email, message_id=f"<{together}>"))
    dovecot.deliver(box.email, message("Re: Order", sender=BUYER, to=box.email, message_id=f"<{answer}>",
                                       extra=f"In-Reply-To: <{together}>\r\n"))
    await _ingest_and_evaluate(settings)

    async with pool.acquire() as conn:
        rows = {r["message_id"]: r for r in await conn.fetch(
            "SELECT id, message_id, correlated_by, correlated_activity_id FROM email_activity WHERE organization_id = $1",
            org.id)}
    assert set(rows) == {first, reply, together, answer}
    created = await _created(settings, org, 4)
    assert set(created) == set(rows)
    for answered, answering in ((first, reply), (together, answer)):
        assert rows[answering]["correlated_by"] == "in_reply_to"
        assert rows[answering]["correlated_activity_id"] == rows[answered]["id"], answering
        assert created[answering]["correlated_by"] == "in_reply_to"
        assert created[answering]["correlated_activity_id"] == str(rows[answered]["id"]), answering
        assert rows[answered]["correlated_activity_id"] is None
        assert created[answered]["correlated_activity_id"] is None


async def test_a_reference_to_an_email_another_replica_recorded_first_names_that_activity(
        org, pool: asyncpg.Pool) -> None:
    """A reply in a batch with the email it answers names the id evaluate gave that email; when another
    replica recorded the email first, under its own id, the reply is linked to that activity, and the
    batch does not fail on the foreign key."""
    tag = uuid.uuid4().hex[:8]

    def row(message_id: str, correlated_to: uuid.UUID | None = None) -> repo.ActivityRow:
        return repo.ActivityRow(
            id=uuid.uuid4(), organization_id=org.id, message_id=message_id, direction="incoming", subject="Order",
            normalized_subject="order", from_address=BUYER, to_addresses=[], cc_addresses=[], parties=[],
            regarding_kind=None, regarding_id=None, tracking_token=None, thread_root=None,
            correlated_by="in_reply_to" if correlated_to else None, raw_sha256=None,  # type: ignore[arg-type]
            preview="", correlated_activity_id=correlated_to)

    elsewhere = row(f"order-{tag}@customer.example")
    mine = row(elsewhere.message_id)
    reply = row(f"re-order-{tag}@customer.example", correlated_to=mine.id)
    async with pool.acquire() as conn:
        async with conn.transaction():
            await repo.insert_activities(conn, [elsewhere])
        async with conn.transaction():
            ids, created = await repo.insert_activities(conn, [mine, reply])
        stored = await conn.fetchval("SELECT correlated_activity_id FROM email_activity WHERE id = $1", reply.id)
    assert ids[(org.id, mine.message_id)] == elsewhere.id and created == {reply.id}
    assert stored == reply.correlated_activity_id == elsewhere.id


async def test_mail_found_in_a_sent_folder_carries_its_bcc_and_when_it_was_sent(
        settings: Settings, registry: Registry, org, dovecot) -> None:
    tag = uuid.uuid4().hex[:8]
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, tracking="all", tracked_folders=["INBOX", "Sent"])
    sent = f"sent-{tag}@example.com"
    hidden = [f"hidden-{tag}@customer.example", f"archive-{tag}@example.com"]
    dovecot.deliver(box.email, message(
        "Proposal", sender=box.email, to=BUYER, message_id=f"<{sent}>",
        extra=f"Bcc: Hidden <{hidden[0].upper()}>, {hidden[1]}\r\n"), folder="Sent")
    await _ingest_and_evaluate(settings)

    event = (await _created(settings, org, 1))[sent]
    assert (event["direction"], event["status"]) == ("outgoing", "sent")
    assert event["bcc_addresses"] == hidden
    assert _time(event["sent_at"]) == DATE_HEADER and event["received_at"] is None
    assert event["tracking_token"] is None   # evaluate assigns none, and the subject carries none


async def test_an_email_dispatch_sent_carries_its_bcc_tracking_token_and_when_it_was_sent(
        settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool, tmp_path) -> None:
    hidden = ["hidden@customer.example", "archive@example.com"]
    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        request = outbound(org, mailbox_id=sender.mailbox_id, to=[BUYER], bcc=hidden, subject="Your quote")
        before = datetime.now(UTC)
        await publish(publisher, request)
        await dispatch(settings)
        final = (await finals(settings, [request.data.idempotency_key])).final(request.data.idempotency_key)
        after = datetime.now(UTC)
        [copy] = capture.messages()
    assert final is not None and final.status == "sent" and final.activity_id is not None
    assert sorted(copy.rcpt_tos) == sorted([BUYER, *hidden])
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT tracking_token, sent_at FROM email_activity WHERE id = $1", final.activity_id)

    event = (await _created(settings, org, 1))[final.message_id]
    assert event["activity_id"] == str(final.activity_id)
    assert event["bcc_addresses"] == hidden
    assert event["tracking_token"] == row["tracking_token"] and row["tracking_token"] in copy.header("Subject")
    sent_at = _time(event["sent_at"])
    assert sent_at is not None and before <= sent_at <= after
    assert abs((sent_at - row["sent_at"]).total_seconds()) < 2, (sent_at, row["sent_at"])
    assert event["received_at"] is None and event["correlated_activity_id"] is None


async def test_an_incoming_activity_carries_the_servers_received_time(
        settings: Settings, registry: Registry, org, dovecot) -> None:
    """The server's INTERNALDATE (a maildir file's modification time, for Dovecot), set here apart from
    the Date header, which the activity's time is not."""
    tag = uuid.uuid4().hex[:8]
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, tracking="all")
    incoming = f"in-{tag}@customer.example"
    dovecot.deliver(box.email, message("Question", sender=BUYER, to=box.email, message_id=f"<{incoming}>"))
    arrived = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    [file] = (dovecot.maildir(box.email) / "new").iterdir()
    os.utime(file, (arrived.timestamp(), arrived.timestamp()))
    await _ingest_and_evaluate(settings)

    [received] = [e["data"] for e in await read_topic(settings, "email.received", 1)
                  if e["data"]["mailbox_id"] == str(box.id)]
    assert _time(received["received_at"]) == arrived   # the server's time, as ingest read it
    event = (await _created(settings, org, 1))[incoming]
    assert (event["direction"], event["status"]) == ("incoming", "received")
    assert _time(event["received_at"]) == arrived != DATE_HEADER
    assert event["sent_at"] is None and event["bcc_addresses"] == []
