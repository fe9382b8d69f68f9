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
