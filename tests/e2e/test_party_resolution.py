"""Party resolution, end to end: the From, To and Cc addresses of a message that came through Dovecot,
ingest and evaluate are resolved against the registry in PostgreSQL to users, queues, contacts,
accounts and leads, whatever the letter case and display names, and an address nobody has is kept
unresolved.  The result is the activity's ``parties`` (one entry per address, in header order, with
its role and records); ``activity.created`` carries the addresses as the message had them.

(``activity.created`` has no resolved parties: a CRM subscriber learns whom the addresses belong to
from PostgreSQL or resolves them itself.)"""
from __future__ import annotations

import uuid

import asyncpg
import pytest

from services.evaluate.service import EvaluateService
from services.ingest.service import IngestService
from shared.lifecycle import run_service
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.mailboxes import imap_profile, message, ready_mailbox
from tests.support.topics import read_topic

pytestmark = pytest.mark.peers


async def test_from_to_and_cc_resolve_to_their_records_and_an_unknown_address_stays_unresolved(
        settings: Settings, registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    tag = uuid.uuid4().hex[:8]
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, tracking="all")
    colleague = await registry.add_user(org, "Colleague", f"colleague-{tag}@example.com")
    queue = await registry.add_queue(org, f"Support {tag}", f"support-{tag}@example.com")
    contact = await registry.add_record(org, "contact", "Bea Buyer", f"bea-{tag}@customer.example")
    account = await registry.add_record(org, "account", "Customer Ltd", f"accounts-{tag}@customer.example")
    lead = await registry.add_record(org, "lead", "Prospect", f"lead-{tag}@prospect.example")
    unknown = f"stranger-{tag}@elsewhere.example"
    async with pool.acquire() as conn:
        owner = await conn.fetchval("SELECT id FROM crm_user WHERE organization_id = $1 AND email = $2", org.id, box.email)

    message_id = f"parties-{tag}@customer.example"
    dovecot.deliver(box.email, message(
        "Parties", message_id=f"<{message_id}>",
        sender=f'"Bea Buyer" <BEA-{tag}@Customer.Example>',
        to=f"{box.email.upper()}, Colleague <colleague-{tag}@example.com>",
        extra=f"Cc: support-{tag}@EXAMPLE.com, \"Accounts\" <accounts-{tag}@customer.example>,\r\n"
              f" lead-{tag}@prospect.example, Someone <{unknown}>\r\n"))
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)

    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT id, from_address, to_addresses, cc_addresses, parties FROM email_activity "
                                  "WHERE organization_id = $1 AND message_id = $2", org.id, message_id)
    assert row is not None, "the message did not become an activity"

    def party(role: str, email: str, *records: tuple[str, uuid.UUID]) -> dict:
        return {"role": role, "email": email, "records": [{"kind": k, "id": str(i)} for k, i in records]}

    assert row["parties"] == [
        party("from", f"bea-{tag}@customer.example", ("contact", contact.id)),
        party("to", box.email, ("user", owner)),
        party("to", f"colleague-{tag}@example.com", ("user", colleague.id)),
        party("cc", f"support-{tag}@example.com", ("queue", queue.id)),
        party("cc", f"accounts-{tag}@customer.example", ("account", account.id)),
        party("cc", f"lead-{tag}@prospect.example", ("lead", lead.id)),
        party("cc", unknown),
    ]

    created = [e["data"] for e in await read_topic(settings, "activity.created", 1)
               if e["organization_id"] == str(org.id)]
    assert [c["activity_id"] for c in created] == [str(row["id"])]
    [event] = created
    assert event["from_address"] == row["from_address"] == f"bea-{tag}@customer.example"
    assert event["to_addresses"] == list(row["to_addresses"]) == [box.email, f"colleague-{tag}@example.com"]
    assert event["cc_addresses"] == list(row["cc_addresses"]) == [
        f"support-{tag}@example.com", f"accounts-{tag}@customer.example", f"lead-{tag}@prospect.example", unknown]
    assert event["mailbox_ids"] == [str(box.id)]


async def _decisions(registry: Registry, org, message_id: str) -> list[tuple[bool, str]]:
    return [(d.tracked, d.reason) for d in await registry.decisions(org, message_id)]


async def test_a_domain_that_only_looks_like_a_colleagues_resolves_to_nobody(
        settings: Settings, registry: Registry, org, dovecot) -> None:
    """Fullwidth letters, a soft hyphen, a zero-width space, an ideographic full stop, a Kelvin sign:
    each is another address (which DMARC checked as it is), never the CEO's it looks like."""
    tag = uuid.uuid4().hex[:8]
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, tracking="email_enabled_records")
    await registry.add_user(org, "Kim (CEO)", f"kim-{tag}@example.com")
    lookalikes = [f"kim-{tag}@ｅｘａｍｐｌｅ.com", f"kim-{tag}@exam\u00adple.com", f"kim-{tag}@exa\u200bmple.com",
                  f"kim-{tag}@example\u3002com", f"\u212aim-{tag}@example.com"]
    ids = [f"lookalike{n}-{tag}@attacker.example" for n in range(len(lookalikes))]
    for sender, message_id in zip(lookalikes, ids):
        dovecot.deliver(box.email, message("Wire transfer today", sender=sender, to=box.email,
                                           message_id=f"<{message_id}>"))
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)
    for sender, message_id in zip(lookalikes, ids):
        assert await _decisions(registry, org, message_id) == [(False, "sender_missing")], sender


async def test_an_internationalised_domain_resolves_in_either_form(
        settings: Settings, registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    """straße.de is xn--strae-oqa.de in DNS (IDNA 2008), not strasse.de (IDNA 2003's mapping); the
    registry takes the A-label form, mail may name it in either."""
    tag = uuid.uuid4().hex[:8]
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, tracking="known_records")
    grete = await registry.add_record(org, "contact", "Grete", f"grete-{tag}@xn--strae-oqa.de")
    await registry.add_record(org, "contact", "Another Grete", f"grete-{tag}@strasse.de")
    ids = {form: f"idn-{form[:3]}-{tag}@customer.example" for form in ("straße.de", "xn--strae-oqa.de")}
    for form, message_id in ids.items():
        dovecot.deliver(box.email, message("Angebot", sender=f"Grete <grete-{tag}@{form}>", to=box.email,
                                           message_id=f"<{message_id}>"))
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)
    for message_id in ids.values():
        assert await _decisions(registry, org, message_id) == [(True, "sender_known_record")]
        async with pool.acquire() as conn:
            parties = await conn.fetchval("SELECT parties FROM email_activity WHERE organization_id = $1 "
                                          "AND message_id = $2", org.id, message_id)
        assert parties[0] == {"role": "from", "email": f"grete-{tag}@xn--strae-oqa.de",
                              "records": [{"kind": "contact", "id": str(grete.id)}]}


async def test_a_sender_several_records_share_is_the_first_of_users_contacts_accounts_leads_queues(
        settings: Settings, registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    """As the reference resolves the From field: a colleague's address that a contact also has is the
    colleague's (so not mail from a known record), a queue's that a contact has is the contact's.
    Recipients resolve to every record of their address."""
    tag = uuid.uuid4().hex[:8]
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, tracking="known_records")
    colleague = f"pat-{tag}@example.com"
    user = await registry.add_user(org, "Pat", colleague)
    private = await registry.add_record(org, "contact", "Pat (private)", colleague)
    helpdesk = f"help-{tag}@partner.example"
    queue = await registry.add_queue(org, f"Help {tag}", helpdesk)
    partner = await registry.add_record(org, "contact", "Partner helpdesk", helpdesk)
    from_colleague, from_helpdesk = f"u-{tag}@example.com", f"q-{tag}@partner.example"
    dovecot.deliver(box.email, message("Lunch?", sender=colleague, to=box.email, message_id=f"<{from_colleague}>"))
    dovecot.deliver(box.email, message("Ticket", sender=helpdesk, to=f"{box.email}, {colleague}",
                                       message_id=f"<{from_helpdesk}>"))
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)

    assert await _decisions(registry, org, from_colleague) == [(False, "sender_not_known_record")]
    assert await _decisions(registry, org, from_helpdesk) == [(True, "sender_known_record")]
    async with pool.acquire() as conn:
        parties = await conn.fetchval("SELECT parties FROM email_activity WHERE organization_id = $1 AND message_id = $2",
                                      org.id, from_helpdesk)
    records = {p["email"]: p["records"] for p in parties}
    assert records[helpdesk] == [{"kind": "contact", "id": str(partner.id)}]
    assert records[colleague] == [{"kind": "user", "id": str(user.id)}, {"kind": "contact", "id": str(private.id)}]
    assert str(queue.id) not in str(parties)
