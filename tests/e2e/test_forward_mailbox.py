"""Forward mailboxes end to end: Dovecot -> ingest -> broker -> evaluate, both services for real in
burst mode.  A forward carrying several messages as attachments, and one message redirected by
several users."""
from __future__ import annotations

import json

import asyncpg
import pytest

from services.evaluate.service import MAX_FORWARDED_MESSAGES, EvaluateService
from shared.events.topics import EMAIL_RECEIVED
from shared.kafka import Publisher
from shared.lifecycle import run_service
from shared.registry.service import Registry
from tests.e2e.test_inbound import activities, pipeline, why
from tests.support.cli import conduit_cli
from tests.support.mailboxes import forward, imap_profile, message, ready_mailbox
from tests.support.topics import read_topic

pytestmark = pytest.mark.peers


async def decision_count(pool: asyncpg.Pool, org) -> int:
    async with pool.acquire() as conn:
        return await conn.fetchval("SELECT count(*) FROM email_decision WHERE organization_id = $1", org.id)


async def test_every_attached_message_of_a_forward_is_tracked_and_the_forward_explains_itself(
        settings, registry: Registry, org, dovecot, pool, publisher: Publisher) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, owner="forward")
    user = await registry.add_user(org, "Fran", "fran@example.com", incoming="forward_mailbox")
    await registry.update_mailbox(org, user.email, email_approved=True, tracking="all")
    inner = [message(f"Attached {n}", sender=f"c{n}@customer.example", message_id=f"<att-{n}@customer.example>")
             for n in range(3)]
    dovecot.deliver(box.email, forward("Fran <fran@example.com>", box.email, "outer-3@example.com", inner, base64_parts=1))
    await pipeline(settings)

    acts = await activities(pool, org)
    assert set(acts) == {"Attached 0", "Attached 1", "Attached 2"}
    assert all(a["mailboxes"] == [user.mailbox_id] for a in acts.values())
    for n in range(3):
        assert await why(registry, org, f"att-{n}@customer.example") == [(user.email, True, "tracked_all")]
    # The forward itself has a decision of its own, under the id the user holds.
    (outer,) = await registry.decisions(org, "outer-3@example.com")
    assert (outer.mailbox_email, outer.tracked, outer.reason) == (box.email, False, "forwarded_messages_extracted")
    assert "3 message(s)" in outer.explanation and all(f"<att-{n}@customer.example>" in outer.explanation for n in range(3))
    code, out, err = await conduit_cli(settings, "message", "why", "<outer-3@example.com>", "--org", org.name)
    assert code == 0 and "forwarded_messages_extracted" in out and "att-2@customer.example" in out, (out, err)

    # The same event delivered again (at-least-once): nothing doubled, no decision rewritten.
    decided = await decision_count(pool, org)
    (event,) = [e for e in await read_topic(settings, EMAIL_RECEIVED.name, 1) if e["data"]["mailbox_id"] == str(box.id)]
    await publisher.publish_raw(EMAIL_RECEIVED.name, json.dumps(event).encode(), str(box.id))
    await run_service(EvaluateService(settings), burst=True)
    again = await activities(pool, org)
    assert {s: (a["id"], a["mailboxes"]) for s, a in again.items()} == {s: (a["id"], a["mailboxes"]) for s, a in acts.items()}
    assert await decision_count(pool, org) == decided == 4


async def test_attached_messages_past_the_limit_are_named_in_the_forwards_decision(
        settings, registry: Registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, owner="forward")
    user = await registry.add_user(org, "Fran", "fran@example.com", incoming="forward_mailbox")
    await registry.update_mailbox(org, user.email, email_approved=True, tracking="all")
    count = MAX_FORWARDED_MESSAGES + 2
    inner = [message(f"Many {n}", message_id=f"<many-{n}@customer.example>") for n in range(count)]
    dovecot.deliver(box.email, forward("fran@example.com", box.email, "outer-many@example.com", inner))
    await pipeline(settings)

    assert set(await activities(pool, org)) == {f"Many {n}" for n in range(MAX_FORWARDED_MESSAGES)}
    (outer,) = await registry.decisions(org, "outer-many@example.com")
    assert (outer.tracked, outer.reason) == (False, "forwarded_messages_over_limit")
    for n in (count - 2, count - 1):   # not evaluated, and said so where the user will look
        assert await why(registry, org, f"many-{n}@customer.example") == []
        assert f"<many-{n}@customer.example>" in outer.explanation
    assert "2 more attached message(s) were not evaluated" in outer.explanation


async def test_each_users_redirect_of_one_message_reaches_their_mailbox_once(
        settings, registry: Registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, owner="forward", tracked_folders=["INBOX", "Archive"])
    ann = await registry.add_user(org, "Ann", "ann@example.com", incoming="forward_mailbox")
    bob = await registry.add_user(org, "Bob", "bob@example.com", incoming="forward_mailbox")
    for user in (ann, bob):
        await registry.update_mailbox(org, user.email, email_approved=True, tracking="all")
    original = message("Redirected", sender="c@customer.example", message_id="<redir-1@customer.example>")
    by_ann = b"Resent-From: ann@example.com\r\nResent-Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n" + original
    by_bob = b"Resent-From: Bob <bob@example.com>\r\nResent-Date: Fri, 27 Nov 2026 10:01:00 +0000\r\n" + original
    dovecot.deliver(box.email, by_ann)
    await pipeline(settings)
    dovecot.deliver(box.email, by_bob)
    dovecot.deliver(box.email, by_ann, folder="Archive")   # Ann's copy again, in another tracked folder
    await pipeline(settings)
    async with pool.acquire() as conn:   # as if the server had renumbered the folders
        await conn.execute("UPDATE imap_folder_state SET uidvalidity = uidvalidity + 1 WHERE mailbox_id = $1", box.id)
    await pipeline(settings)

    acts = await activities(pool, org)
    assert set(acts) == {"Redirected"} and sorted(acts["Redirected"]["mailboxes"]) == sorted([ann.mailbox_id, bob.mailbox_id])
    assert await why(registry, org, "redir-1@customer.example") == [
        (ann.email, True, "tracked_all"), (bob.email, True, "already_tracked")]
    # Each user's copy published once, under the author's Message-ID; Ann's second copy not at all.
    events = [e["data"] for e in await read_topic(settings, EMAIL_RECEIVED.name, 2) if e["data"]["mailbox_id"] == str(box.id)]
    assert sorted((e["message_id"], e["forwarded_by"]) for e in events) == [
        ("redir-1@customer.example", "ann@example.com"), ("redir-1@customer.example", "bob@example.com")]


async def test_the_forwarder_is_the_address_not_an_address_in_the_display_name(
        settings, registry: Registry, org, dovecot, pool) -> None:
    """DMARC vouches for the address, not the display name: mail from mallory whose display name is
    the CEO's address is not the CEO's forward; Alice's forward with an old address in a comment is hers."""
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, owner="forward")
    ceo = await registry.add_user(org, "CEO", "ceo@example.com", incoming="forward_mailbox")
    alice = await registry.add_user(org, "Alice", "alice@example.com", incoming="forward_mailbox")
    for user in (ceo, alice):
        await registry.update_mailbox(org, user.email, email_approved=True, tracking="all")
    dovecot.deliver(box.email, message("from mallory", sender='"ceo@example.com" <mallory@evil.example>',
                                       to=box.email, message_id="<spoof-1@evil.example>"))
    dovecot.deliver(box.email, message("alice forwards", sender="Alice (formerly al@old.example) <alice@example.com>",
                                       to=box.email, message_id="<alice-1@example.com>"))
    await pipeline(settings)
    assert ceo.email not in [mailbox for mailbox, *_ in await why(registry, org, "spoof-1@evil.example")]
    assert await why(registry, org, "alice-1@example.com") == [(alice.email, True, "tracked_all")]
