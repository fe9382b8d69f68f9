"""Folder-level tracking, end to end: mail APPENDed into a mapped folder on Dovecot is ingested,
evaluated and recorded as an activity regarding the mapped record, whatever the tracking option;
mail in other folders is not.  Ingest and evaluate run for real, in burst mode."""
from __future__ import annotations

import asyncio
import imaplib
import json

import pytest

from services.evaluate.service import EvaluateService
from services.ingest.service import IngestService
from shared.lifecycle import run_service
from shared.registry.service import Registry
from tests.support.cli import conduit_cli
from tests.support.mailboxes import imap_profile, message, ready_mailbox

pytestmark = pytest.mark.peers


async def pipeline(settings) -> None:
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)


async def regarding(pool, org, message_id: str) -> tuple[str | None, object] | None:
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT regarding_kind, regarding_id FROM email_activity "
                                  "WHERE organization_id = $1 AND message_id = $2", org.id, message_id)
    return (row["regarding_kind"], row["regarding_id"]) if row else None


async def test_mail_in_a_mapped_folder_regards_the_mapped_record(settings, registry: Registry, org, dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    acme = await registry.add_record(org, "account", "Acme", "info@acme.example")
    await registry.add_record(org, "contact", "Bea", "bea@customer.example")
    # "Known records": a stranger's mail is not tracked, except where a folder rule says so.
    box = await ready_mailbox(registry, org, dovecot, tracking="known_records", tracked_folders=["INBOX", "Projects"])
    _, added = await registry.add_folder_rule(org, box.email, "Acme", "account:info@acme.example")
    assert added   # the mapped folder became a tracked one

    await dovecot.append(box.email, box.password, message("Order 17", sender="buyer@stranger.example",
                                                          message_id="<mapped-1@stranger.example>"), folder="Acme")
    await dovecot.append(box.email, box.password, message("Order 18", sender="buyer@stranger.example",
                                                          message_id="<unmapped-1@stranger.example>"), folder="Projects")
    await dovecot.append(box.email, box.password, message("Hello", sender="bea@customer.example",
                                                          message_id="<inbox-1@customer.example>"))
    await pipeline(settings)

    assert await regarding(pool, org, "mapped-1@stranger.example") == ("account", acme.id)
    assert await regarding(pool, org, "unmapped-1@stranger.example") is None          # not tracked at all
    assert await regarding(pool, org, "inbox-1@customer.example") == (None, None)     # tracked, regarding nothing
    decisions = {d.message_id: (d.tracked, d.rule, d.reason) for d in
                 [*await registry.decisions(org, "mapped-1@stranger.example"),
                  *await registry.decisions(org, "unmapped-1@stranger.example")]}
    assert decisions == {"mapped-1@stranger.example": (True, "folder_tracking", "tracked_folder_rule"),
                         "unmapped-1@stranger.example": (False, "not_from_known_record", "sender_unknown")}

    code, out, err = await conduit_cli(settings, "message", "why", "<mapped-1@stranger.example>", "--org", org.name)
    assert code == 0 and f"{box.email}: tracked [tracked_folder_rule, rule folder_tracking]" in out, (out, err)
    assert f"maps to account {acme.id}" in out
    code, out, err = await conduit_cli(settings, "activity", "show", "mapped-1@stranger.example", "--org", org.name, "--json")
    assert json.loads(out)["activity"]["regarding_id"] == str(acme.id), out


async def test_a_message_moved_into_a_mapped_folder_after_it_was_processed_is_not_processed_again(
        settings, registry: Registry, org, dovecot, pool) -> None:
    """What docs/inbound.md says: ingest knows the message by its Message-ID, so the move is not a
    new message, and its first decision stands."""
    await registry.add_profile(org, imap_profile(dovecot))
    acme = await registry.add_record(org, "account", "Acme", "info@acme.example")
    box = await ready_mailbox(registry, org, dovecot, tracking="known_records", tracked_folders=["INBOX", "Projects"])
    await registry.add_folder_rule(org, box.email, "Acme", f"account:{acme.id}")
    await dovecot.append(box.email, box.password, message("Order 19", sender="buyer@stranger.example",
                                                          message_id="<moved-1@stranger.example>"), folder="Projects")
    await dovecot.append(box.email, box.password, message("Order 20", sender="buyer@stranger.example",
                                                          message_id="<other-1@stranger.example>"), folder="Acme")
    await pipeline(settings)
    await asyncio.to_thread(_move_all, dovecot, box, "Projects", "Acme")
    await pipeline(settings)

    assert await regarding(pool, org, "moved-1@stranger.example") is None
    assert [(d.tracked, d.reason) for d in await registry.decisions(org, "moved-1@stranger.example")] == \
        [(False, "sender_unknown")]
    assert await regarding(pool, org, "other-1@stranger.example") == ("account", acme.id)


def _move_all(dovecot, box, source: str, target: str) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=30) as imap:
        imap.login(box.email, box.password)
        imap.select(source)
        typ, data = imap.uid("MOVE", "1:*", target)
        assert typ == "OK", data
        imap.logout()
