"""Mail in, end to end: Dovecot -> ingest -> broker -> evaluate -> activities and decisions in
PostgreSQL.  Both services run for real, in burst mode, so nothing waits on a clock."""
from __future__ import annotations

import json
import uuid

import asyncpg
import pytest
from pydantic import SecretStr

from services.evaluate.service import EvaluateService
from services.ingest.service import IngestService
from shared.lifecycle import run_service
from shared.registry.service import Registry
from tests.support.cli import conduit_cli
from tests.support.mailboxes import imap_profile, message, pop3_profile, ready_mailbox
from tests.support.topics import read_topic

pytestmark = pytest.mark.peers


async def pipeline(settings) -> None:
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)


async def activities(pool: asyncpg.Pool, org) -> dict[str, asyncpg.Record]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT a.*, array_agg(am.mailbox_id) AS mailboxes FROM email_activity a
               JOIN email_activity_mailbox am ON am.activity_id = a.id WHERE a.organization_id = $1 GROUP BY a.id""", org.id)
    return {r["subject"]: r for r in rows}


async def why(registry: Registry, org, message_id: str) -> list[tuple[str, bool, str]]:
    return [(d.mailbox_email, d.tracked, d.reason) for d in await registry.decisions(org, message_id)]


async def test_track_all_creates_one_activity_per_message(settings, registry: Registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, tracking="all")
    for i in range(3):
        dovecot.deliver(box.email, message(f"hello {i}", to=box.email))
    await pipeline(settings)
    acts = await activities(pool, org)
    assert set(acts) == {"hello 0", "hello 1", "hello 2"}
    assert all(a["direction"] == "incoming" and a["status"] == "received" for a in acts.values())
    await pipeline(settings)  # nothing new, nothing doubled
    assert len(await activities(pool, org)) == 3
    # An external CRM learns of each activity once, on `activity.created`, with its mailbox.
    created = [e for e in await read_topic(settings, "activity.created", 3) if e["organization_id"] == str(org.id)]
    assert sorted(e["data"]["subject"] for e in created) == ["hello 0", "hello 1", "hello 2"]
    assert all(e["data"]["mailbox_ids"] == [str(box.id)] for e in created)


async def test_one_activity_when_a_message_reaches_two_tracked_mailboxes(settings, registry: Registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    ann = await ready_mailbox(registry, org, dovecot, tracking="all")
    bob = await ready_mailbox(registry, org, dovecot, tracking="all")
    raw = message("to both", message_id="<both-1@customer.example>", to=f"{ann.email}, {bob.email}")
    dovecot.deliver(ann.email, raw)
    dovecot.deliver(bob.email, raw)
    await pipeline(settings)
    acts = await activities(pool, org)
    assert len(acts) == 1 and set(acts["to both"]["mailboxes"]) == {ann.id, bob.id}
    decisions = await why(registry, org, "both-1@customer.example")
    assert sorted(t for _, t, _ in decisions) == [True, True]


async def test_responses_option_tracks_only_correlated_mail(settings, registry: Registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    tracker = await ready_mailbox(registry, org, dovecot, tracking="all")
    box = await ready_mailbox(registry, org, dovecot, tracking="responses")
    dovecot.deliver(tracker.email, message("Quote", message_id="<orig-1@example.com>"))
    await pipeline(settings)
    dovecot.deliver(box.email, message("Re: Quote", message_id="<reply-1@customer.example>",
                                       extra="In-Reply-To: <orig-1@example.com>\r\n"))
    dovecot.deliver(box.email, message("Unrelated", message_id="<other-1@customer.example>"))
    await pipeline(settings)
    acts = await activities(pool, org)
    assert acts["Re: Quote"]["correlated_by"] == "in_reply_to"
    assert "Unrelated" not in acts
    assert await why(registry, org, "other-1@customer.example") == [(box.email, False, "no_correlation_match")]

    # The support question, answered in one command each, as a user runs them.
    code, out, err = await conduit_cli(settings, "message", "why", "<other-1@customer.example>", "--org", org.name)
    assert code == 0 and box.email in out and "no_correlation_match" in out and "Traceback" not in err, (out, err)
    code, out, err = await conduit_cli(settings, "message", "why", "reply-1@customer.example", "--org", org.name, "--json")
    (decision,) = json.loads(out)
    assert code == 0 and decision["tracked"] and decision["mailbox_email"] == box.email, out
    code, out, err = await conduit_cli(settings, "activity", "show", "reply-1@customer.example", "--org", org.name, "--json")
    shown = json.loads(out)
    assert code == 0 and shown["activity"]["id"] == str(acts["Re: Quote"]["id"]), out
    assert shown["activity"]["correlated_by"] == "in_reply_to" and [d["tracked"] for d in shown["decisions"]] == [True]
    code, out, err = await conduit_cli(settings, "activity", "show", "reply-1@customer.example", "--org", org.name)
    assert code == 0 and ["mailbox", "ids", str(box.id)] in [line.split() for line in out.splitlines()], out
    assert "UUID(" not in out and "['" not in out, out
    code, out, err = await conduit_cli(settings, "activity", "show", "no-such@customer.example", "--org", org.name)
    assert code == 2 and "Traceback" not in err and err.strip(), err


@pytest.mark.parametrize("method", ["references", "tracking_token", "thread_index"])
async def test_each_correlation_path(settings, registry: Registry, org, dovecot, pool, method: str) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    contact = await registry.add_record(org, "account", "Customer Ltd", "boss@customer.example")
    tracker = await ready_mailbox(registry, org, dovecot, tracking="all")
    box = await ready_mailbox(registry, org, dovecot, tracking="responses")
    thread = "AQHZ1aBcDEFGHIJKLMNOPQRSTUVWXYZ012"
    first_extra = {"thread_index": f"Thread-Index: {thread}\r\n"}.get(method, "")
    dovecot.deliver(tracker.email, message("Deal CRM:0004242" if method == "tracking_token" else "Deal",
                                           message_id="<deal-1@example.com>", extra=first_extra))
    await pipeline(settings)
    async with pool.acquire() as conn:  # the thread's email regards the account
        await conn.execute("UPDATE email_activity SET regarding_kind = 'account', regarding_id = $2 WHERE organization_id = $1",
                           org.id, contact.id)
    extra = {
        "references": "References: <unknown@x.example> <deal-1@example.com>\r\n",
        "tracking_token": "",
        "thread_index": f"Thread-Index: {thread}AAAAAAAAAA==\r\n",
    }[method]
    subject = "RE: Deal CRM:0004242" if method == "tracking_token" else "Re: something else"
    dovecot.deliver(box.email, message(subject, extra=extra))
    await pipeline(settings)
    reply = (await activities(pool, org))[subject]
    assert reply["correlated_by"] == method
    assert (reply["regarding_kind"], reply["regarding_id"]) == ("account", contact.id)


async def test_known_records_option(settings, registry: Registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    await registry.add_record(org, "contact", "Bea", "bea@customer.example")
    box = await ready_mailbox(registry, org, dovecot, tracking="known_records")
    dovecot.deliver(box.email, message("from bea", sender="Bea <bea@customer.example>", message_id="<k1@c.example>"))
    dovecot.deliver(box.email, message("from stranger", sender="stranger@else.example", message_id="<k2@c.example>"))
    await pipeline(settings)
    assert set(await activities(pool, org)) == {"from bea"}
    assert (await why(registry, org, "k2@c.example"))[0][1:] == (False, "sender_unknown")


async def test_email_enabled_records_option(settings, registry: Registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    await registry.add_record(org, "lead", "Lee", "lee@customer.example", email_enabled=False)
    await registry.add_record(org, "contact", "Cy", "cy@customer.example")
    box = await ready_mailbox(registry, org, dovecot, tracking="email_enabled_records")
    dovecot.deliver(box.email, message("from lee", sender="lee@customer.example", message_id="<e1@c.example>"))
    dovecot.deliver(box.email, message("from cy", sender="cy@customer.example", message_id="<e2@c.example>"))
    await pipeline(settings)
    assert set(await activities(pool, org)) == {"from cy"}
    assert (await why(registry, org, "e1@c.example"))[0][1] is False


async def test_forward_mailbox_attributes_to_the_forwarding_user_only(settings, registry: Registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    forward = await ready_mailbox(registry, org, dovecot, owner="forward")
    user = await registry.add_user(org, "Fran", "fran@example.com", incoming="forward_mailbox")
    await registry.update_mailbox(org, user.email, email_approved=True, tracking="all")
    inner = message("Original from customer", sender="cust@customer.example", message_id="<inner-1@customer.example>")
    outer = (b"From: Fran <fran@example.com>\r\nTo: " + forward.email.encode() + b"\r\nSubject: Fwd: Original\r\n"
             b"Message-ID: <outer-1@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
             b"--b1\r\nContent-Type: text/plain\r\n\r\nFYI\r\n--b1\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--b1--\r\n")
    dovecot.deliver(forward.email, outer)
    dovecot.deliver(forward.email, message("from a stranger", sender="nobody@else.example", message_id="<fw-2@else.example>"))
    await pipeline(settings)
    acts = await activities(pool, org)
    assert set(acts) == {"Original from customer"}
    assert acts["Original from customer"]["mailboxes"] == [user.mailbox_id]
    assert await why(registry, org, "fw-2@else.example") == [(forward.email, False, "forwarder_unknown")]


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_a_profile_with_impersonation_reads_each_users_own_mailbox(settings, registry: Registry, org, dovecot,
                                                                         pool, protocol: str) -> None:
    """One service account signs in for every mailbox of the profile and acts as each mailbox's user
    (SASL PLAIN's authorization identity, a Dovecot master user): each mailbox ingests its own mail,
    not the service account's; a wrong profile password is the mailbox's credentials alert."""
    service_user, service_password = f"svc-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex[:8]}"
    dovecot.add_master_user(service_user, service_password)
    make = imap_profile if protocol == "imap" else pop3_profile
    profile = await registry.add_profile(org, make(dovecot, f"impersonating-{protocol}", auth_method="profile_impersonation",
                                                   profile_username=service_user, profile_secret=SecretStr(service_password)))
    boxes = [await ready_mailbox(registry, org, dovecot, profile=profile.name) for _ in range(2)]
    for box in boxes:
        dovecot.deliver(box.email, message(f"for {box.email}", to=box.email))
    await pipeline(settings)
    acts = await activities(pool, org)
    assert {subject: a["mailboxes"] for subject, a in acts.items()} == {f"for {b.email}": [b.id] for b in boxes}

    await registry.update_profile(org, profile.name, profile_secret=SecretStr("wrong"))
    await run_service(IngestService(settings), burst=True)
    state = await registry.mailbox(org, boxes[0].email)
    assert state.incoming.error_count == 1 and [a.code for a in state.alerts][-1:] == ["authentication_failed"], state.alerts


async def test_queue_deletes_from_server_only_after_processing(settings, registry: Registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", delete_after_processing=True)
    dovecot.deliver_many(queue.email, [message(f"q{i}") for i in range(3)])
    await run_service(IngestService(settings), burst=True)
    assert dovecot.message_count(queue.email) == 3  # not yet decided: still on the server
    await run_service(EvaluateService(settings), burst=True)
    await run_service(IngestService(settings), burst=True)
    assert dovecot.message_count(queue.email) == 0
    assert len(await activities(pool, org)) == 3


async def test_pop3_queue_deletes_after_processing(settings, registry: Registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, pop3_profile(dovecot))
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", delete_after_processing=True)
    dovecot.deliver_many(queue.email, [message(f"p{i}") for i in range(2)])
    await pipeline(settings)
    await run_service(IngestService(settings), burst=True)
    assert dovecot.message_count(queue.email) == 0
    assert len(await activities(pool, org)) == 2


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_a_queue_deletes_every_delivered_copy_of_a_processed_message(settings, registry: Registry, org, dovecot,
                                                                          pool, protocol: str) -> None:
    """The same message delivered twice (two distribution lists, a sender's retry) is one activity,
    and both copies leave the server once it is durable, the second found in a later sync too."""
    await registry.add_profile(org, imap_profile(dovecot) if protocol == "imap" else pop3_profile(dovecot))
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", delete_after_processing=True)
    twice = message("delivered twice", message_id="<twice-%s@customer.example>" % uuid.uuid4().hex[:8])
    dovecot.deliver_many(queue.email, [twice, message("once"), twice])
    await pipeline(settings)
    dovecot.deliver(queue.email, twice)   # a third copy, after the first was ingested
    await run_service(IngestService(settings), burst=True)
    await run_service(IngestService(settings), burst=True)
    assert dovecot.message_count(queue.email) == 0
    assert sorted(a for a in await activities(pool, org)) == ["delivered twice", "once"]


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_a_queue_never_deletes_another_message_that_reuses_a_processed_message_id(
        settings, registry: Registry, org, dovecot, pool, protocol: str) -> None:
    """A scanner that gives every message the same Message-ID, or a forged one: the second message
    is no copy of the first, so it is not deleted with it (it stays on the server)."""
    await registry.add_profile(org, imap_profile(dovecot) if protocol == "imap" else pop3_profile(dovecot))
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", delete_after_processing=True)
    reused = "<static-%s@scanner.example>" % uuid.uuid4().hex[:8]
    dovecot.deliver_many(queue.email, [message("scan 1", message_id=reused),
                                       message("scan 2", message_id=reused, body="Another page.\r\n")])
    await pipeline(settings)
    dovecot.deliver(queue.email, message("scan 3", message_id=reused, body="A third page.\r\n"))
    await run_service(IngestService(settings), burst=True)
    await run_service(IngestService(settings), burst=True)
    assert dovecot.message_count(queue.email) == 2, "scan 1 is deleted once processed; scans 2 and 3 stay"
    assert list(await activities(pool, org)) == ["scan 1"]


async def test_a_message_reusing_a_message_id_in_another_folder_does_not_take_its_place(
        settings, registry: Registry, org, dovecot, pool) -> None:
    """The same while the queue does not delete yet: the other message found in another tracked
    folder must not become the ingested message's place, or turning deletion on removes it (it was
    never ingested nor an activity) and leaves the processed one on the server."""
    await registry.add_profile(org, imap_profile(dovecot))
    queue = await ready_mailbox(registry, org, dovecot, owner="queue", tracked_folders=["INBOX", "Scans"])
    reused = "<static-%s@scanner.example>" % uuid.uuid4().hex[:8]
    dovecot.deliver(queue.email, message("scan 1", message_id=reused))
    await pipeline(settings)
    dovecot.deliver(queue.email, message("scan 2", message_id=reused, body="Another page.\r\n"), folder="Scans")
    await run_service(IngestService(settings), burst=True)
    await registry.update_mailbox(org, queue.email, delete_after_processing=True)
    await run_service(IngestService(settings), burst=True)
    assert (dovecot.message_count(queue.email), dovecot.message_count(queue.email, "Scans")) == (0, 1), \
        "scan 1 is deleted once processed; scan 2 stays"
    assert list(await activities(pool, org)) == ["scan 1"]


async def test_broken_mime_still_becomes_an_activity(settings, registry: Registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, tracking="all")
    dovecot.deliver(box.email, b"Subject: =?utf-8?B?broken\r\nFrom: <<<@@@>>>\r\nContent-Type: multipart/mixed\r\n\r\n\xff\xfe garbage")
    await pipeline(settings)
    acts = await activities(pool, org)
    assert len(acts) == 1


@pytest.mark.parametrize("smart_matching", [True, False])
async def test_smart_matching_links_a_reply_without_thread_headers(settings, registry: Registry, org, dovecot, pool,
                                                                    smart_matching: bool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    org = await registry.configure_correlation(org, smart_matching=smart_matching)
    tracker = await ready_mailbox(registry, org, dovecot, tracking="all")
    box = await ready_mailbox(registry, org, dovecot, tracking="responses")
    dovecot.deliver(tracker.email, message("Pricing for Q3", sender="boss@customer.example", to=tracker.email,
                                           message_id="<sm-1@customer.example>"))
    await pipeline(settings)
    # The reply's client dropped In-Reply-To and References; only subject and people tie it to the thread.
    dovecot.deliver(box.email, message("RE: Fwd: Pricing for Q3", sender="boss@customer.example",
                                       to=f"{box.email}, {tracker.email}", message_id="<sm-2@customer.example>"))
    await pipeline(settings)
    acts = await activities(pool, org)
    if smart_matching:
        assert acts["RE: Fwd: Pricing for Q3"]["correlated_by"] == "smart_matching"
    else:  # off by default, as the reference recommends: the reply is not a response to anything tracked
        assert "RE: Fwd: Pricing for Q3" not in acts
        assert await why(registry, org, "sm-2@customer.example") == [(box.email, False, "no_correlation_match")]


async def test_smart_matching_does_not_tie_two_customers_through_the_mailbox_they_wrote_to(
        settings, registry: Registry, org, dovecot, pool) -> None:
    """Two customers' "Invoice" to one support queue share only the queue's address: two threads."""
    await registry.add_profile(org, imap_profile(dovecot))
    org = await registry.configure_correlation(org, smart_matching=True)
    support = await ready_mailbox(registry, org, dovecot, owner="queue", tracking="all")
    dovecot.deliver(support.email, message("Invoice", sender="ann@acme.example", to=support.email,
                                           message_id="<inv-1@acme.example>"))
    await pipeline(settings)
    dovecot.deliver(support.email, message("RE: Invoice", sender="bob@globex.example", to=support.email,
                                           message_id="<inv-2@globex.example>"))
    await pipeline(settings)
    assert (await activities(pool, org))["RE: Invoice"]["correlated_by"] is None


async def test_smart_matching_asks_for_as_many_shared_participants_as_the_organization_says(
        settings, registry: Registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    org = await registry.configure_correlation(org, smart_matching=True, smart_matching_min_recipients=2)
    tracker = await ready_mailbox(registry, org, dovecot, tracking="all")
    box = await ready_mailbox(registry, org, dovecot, tracking="responses")
    for subject in ("Pricing for Q3", "Pricing for Q4"):
        dovecot.deliver(tracker.email, message(subject, sender="boss@customer.example", to=tracker.email))
    await pipeline(settings)
    # Boss and the tracker's owner shared with the first; only boss with the second.
    dovecot.deliver(box.email, message("RE: Pricing for Q3", sender="boss@customer.example",
                                       to=f"{box.email}, {tracker.email}", message_id="<mr-1@customer.example>"))
    dovecot.deliver(box.email, message("RE: Pricing for Q4", sender="boss@customer.example", to=box.email,
                                       message_id="<mr-2@customer.example>"))
    await pipeline(settings)
    assert (await activities(pool, org))["RE: Pricing for Q3"]["correlated_by"] == "smart_matching"
    assert await why(registry, org, "mr-2@customer.example") == [(box.email, False, "no_correlation_match")]


async def test_queue_convert_setting_and_its_tracking_option(settings, registry: Registry, org, dovecot, pool) -> None:
    """A queue converts with the same choices as a user's tracking options, and not at all when
    'convert incoming email to activities' is off."""
    await registry.add_profile(org, imap_profile(dovecot))
    await registry.add_record(org, "contact", "Kim", "kim@customer.example")
    silent = await ready_mailbox(registry, org, dovecot, owner="queue", tracking="all", convert_to_activities=False)
    known = await ready_mailbox(registry, org, dovecot, owner="queue", tracking="known_records")
    dovecot.deliver(silent.email, message("to the silent queue", sender="kim@customer.example", message_id="<qc-1@c.example>"))
    dovecot.deliver(known.email, message("kim to support", sender="Kim <kim@customer.example>", message_id="<qc-2@c.example>"))
    dovecot.deliver(known.email, message("stranger to support", sender="who@else.example", message_id="<qc-3@c.example>"))
    await pipeline(settings)
    acts = await activities(pool, org)
    assert set(acts) == {"kim to support"} and acts["kim to support"]["mailboxes"] == [known.id]
    assert await why(registry, org, "qc-1@c.example") == [(silent.email, False, "queue_conversion_off")]
    assert await why(registry, org, "qc-3@c.example") == [(known.email, False, "sender_unknown")]


@pytest.mark.parametrize("order", [None, ["tracking_token", "in_reply_to", "thread_index", "smart_matching"]])
async def test_the_organizations_correlation_order_decides_between_two_threads(
        settings, registry: Registry, org, dovecot, pool, order: list[str] | None) -> None:
    """A reply that answers one thread by In-Reply-To and names another by its tracking token
    regards the thread of whichever method comes first in the organization's order."""
    await registry.add_profile(org, imap_profile(dovecot))
    if order:
        org = await registry.configure_correlation(org, correlation_order=order)
    first = await registry.add_record(org, "account", "First Ltd", "first@customer.example")
    second = await registry.add_record(org, "account", "Second Ltd", "second@customer.example")
    tracker = await ready_mailbox(registry, org, dovecot, tracking="all")
    box = await ready_mailbox(registry, org, dovecot, tracking="responses")
    dovecot.deliver(tracker.email, message("Renewal", message_id="<co-1@example.com>"))
    dovecot.deliver(tracker.email, message("Offer CRM:0007777", message_id="<co-2@example.com>"))
    await pipeline(settings)
    async with pool.acquire() as conn:
        for message_id, account in (("co-1@example.com", first), ("co-2@example.com", second)):
            await conn.execute("""UPDATE email_activity SET regarding_kind = 'account', regarding_id = $3
                                  WHERE organization_id = $1 AND message_id = $2""", org.id, message_id, account.id)
    dovecot.deliver(box.email, message("RE: Renewal CRM:0007777", message_id="<co-3@customer.example>",
                                       extra="In-Reply-To: <co-1@example.com>\r\n"))
    await pipeline(settings)
    reply = (await activities(pool, org))["RE: Renewal CRM:0007777"]
    expected = ("in_reply_to", first.id) if order is None else ("tracking_token", second.id)
    assert (reply["correlated_by"], reply["regarding_id"]) == expected
