"""A reply to an email Conduit sent is tracked against it: dispatch records the outgoing activity with
the Message-ID it used and the tracking token it put in the subject, and a reply that reaches a
mailbox on "responses" (which tracks only mail that answers tracked mail) correlates to it, by its
In-Reply-To, or by the token alone, and regards the sent email's record.

Against a running dispatch and aiosmtpd (`conduit send` as a user runs it), then Dovecot, the broker,
ingest and evaluate (burst mode) and PostgreSQL."""
from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from conduit.peers.smtp import CaptureSmtpServer
from services.evaluate.service import EvaluateService
from services.ingest.service import IngestService
from shared.lifecycle import run_service
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.cli import conduit_cli
from tests.support.dispatch import dispatch_running, sending_mailbox
from tests.support.mailboxes import imap_profile, message, ready_mailbox

pytestmark = pytest.mark.peers

BUYER = "buyer@customer.example"


async def _activity(pool: asyncpg.Pool, org, message_id: str) -> asyncpg.Record | None:
    async with pool.acquire() as conn:
        return await conn.fetchrow(
            """SELECT id, direction, correlated_by, regarding_kind, regarding_id, tracking_token FROM email_activity
               WHERE organization_id = $1 AND message_id = $2""", org.id, message_id)


async def _quote_sent(settings: Settings, registry: Registry, org, dovecot, tmp_path, regarding) -> tuple[dict, object, object]:
    """"Quote 7" sent by a running dispatch to the buyer with `conduit send --wait`, regarding
    ``regarding``: what the command answered, the copy the server took, and a mailbox on "responses"
    (which tracks only mail that answers tracked mail) for the buyer's reply."""
    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        box = await ready_mailbox(registry, org, dovecot, tracking="responses", profile="dovecot-imap")
        async with dispatch_running(settings):
            code, out, err = await conduit_cli(
                settings, "send", "--org", org.name, "--from", sender.email, "--to", BUYER, "--subject", "Quote 7",
                "--text", "Here it is.", "--key", f"quote-{uuid.uuid4().hex[:8]}", "--wait", "--json",
                "--regarding", f"account:{regarding.id}")
        assert code == 0, (out, err)
        [copy] = capture.messages()
    return json.loads(out), copy, box


@pytest.mark.parametrize("how", ["in_reply_to", "tracking_token"])
async def test_a_reply_to_an_email_conduit_sent_correlates_to_it(
        settings: Settings, registry: Registry, org, dovecot, pool: asyncpg.Pool, tmp_path, how: str) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    acme = await registry.add_record(org, "account", "Acme", f"acme-{uuid.uuid4().hex[:6]}@customer.example")
    sent, copy, box = await _quote_sent(settings, registry, org, dovecot, tmp_path, acme)
    assert sent["status"] == "sent", sent
    outgoing = await _activity(pool, org, sent["message_id"])
    assert outgoing is not None and outgoing["direction"] == "outgoing"
    # The token dispatch recorded is the one the recipient sees in the subject.
    subject = copy.header("Subject")
    assert outgoing["tracking_token"] and outgoing["tracking_token"] in subject, (subject, outgoing)

    if how == "in_reply_to":  # a subject of its own: only the header can tie it to the sent email
        reply_subject, extra = "RE: something else", f"In-Reply-To: <{sent['message_id']}>\r\n"
    else:  # no In-Reply-To or References: only the token in the subject can
        reply_subject, extra = f"RE: {subject}", ""
    reply_id = f"r-{uuid.uuid4().hex[:8]}@customer.example"
    dovecot.deliver(box.email, message(reply_subject, sender=BUYER, to=box.email, message_id=f"<{reply_id}>", extra=extra))
    # Its control: mail from the same buyer that answers nothing is not tracked on "responses".
    other_id = f"o-{uuid.uuid4().hex[:8]}@customer.example"
    dovecot.deliver(box.email, message("Another question", sender=BUYER, to=box.email, message_id=f"<{other_id}>"))
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)

    reply = await _activity(pool, org, reply_id)
    assert reply is not None, "the reply was not tracked: it did not correlate to the sent email"
    assert (reply["direction"], reply["correlated_by"]) == ("incoming", how)
    assert reply["id"] != outgoing["id"]
    assert (reply["regarding_kind"], reply["regarding_id"]) == ("account", acme.id)
    assert await _activity(pool, org, other_id) is None
    assert [(d.tracked, d.reason) for d in await registry.decisions(org, other_id)] == [(False, "no_correlation_match")]


async def test_a_token_another_sender_used_first_does_not_take_the_replies_to_the_email_conduit_sent(
        settings: Settings, registry: Registry, org, dovecot, pool: asyncpg.Pool, tmp_path) -> None:
    """Mail from elsewhere with the next tracking tokens in its subject (another CRM's default "CRM:"
    prefix, or numbers guessed) is tracked first; the reply to the email Conduit then sends with one
    of those tokens still regards the sent email's record, not the stranger's mail."""
    await registry.add_profile(org, imap_profile(dovecot))
    acme = await registry.add_record(org, "account", "Acme", f"acme-{uuid.uuid4().hex[:6]}@customer.example")
    shared = await ready_mailbox(registry, org, dovecot, tracking="all", profile="dovecot-imap")
    async with pool.acquire() as conn:
        last, called = await conn.fetchrow("SELECT last_value, is_called FROM tracking_token_seq")
    upcoming = last + 1 if called else last
    for n in range(upcoming, upcoming + 5):   # tests running beside this one may take a number or two
        dovecot.deliver(shared.email, message(f"Our ticket CRM:{n:07d}", sender="x@other.example", to=shared.email))
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)

    _, copy, box = await _quote_sent(settings, registry, org, dovecot, tmp_path, acme)
    subject = copy.header("Subject")
    token = subject.split("CRM:")[1]
    assert upcoming <= int(token) < upcoming + 5, "the stranger's mail did not carry the token dispatch used"
    reply_id = f"r-{uuid.uuid4().hex[:8]}@customer.example"
    dovecot.deliver(box.email, message(f"RE: {subject}", sender=BUYER, to=box.email, message_id=f"<{reply_id}>"))
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)
    reply = await _activity(pool, org, reply_id)
    assert reply is not None and reply["correlated_by"] == "tracking_token"
    assert (reply["regarding_kind"], reply["regarding_id"]) == ("account", acme.id)
