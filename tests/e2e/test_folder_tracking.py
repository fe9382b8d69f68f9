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
from tests.support.topics import read_topic

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


async def test_a_message_moved_into_a_mapped_folder_after_it_was_processed_is_filed_under_the_record(
        settings, registry: Registry, org, dovecot, pool) -> None:
    """The reference's folder-level tracking: mail moved into a mapped folder is tracked regarding
    the folder's record, also after it was first decided in another tracked folder.  A message that
    was not tracked becomes an activity; one that was tracked regarding something else (or nothing)
    is re-filed under the record, and `activity.updated` says so."""
    await registry.add_profile(org, imap_profile(dovecot))
    acme = await registry.add_record(org, "account", "Acme", "info@acme.example")
    await registry.add_record(org, "contact", "Bea", "bea@customer.example")   # her mail is tracked
    box = await ready_mailbox(registry, org, dovecot, tracking="known_records", tracked_folders=["INBOX", "Projects"])
    await registry.add_folder_rule(org, box.email, "Acme", f"account:{acme.id}")
    await dovecot.append(box.email, box.password, message("Order 19", sender="buyer@stranger.example",
                                                          message_id="<moved-1@stranger.example>"), folder="Projects")
    await dovecot.append(box.email, box.password, message("Quote", sender="bea@customer.example",
                                                          message_id="<moved-2@customer.example>"), folder="Projects")
    await dovecot.append(box.email, box.password, message("Order 20", sender="buyer@stranger.example",
                                                          message_id="<other-1@stranger.example>"), folder="Acme")
    await pipeline(settings)
    assert await regarding(pool, org, "moved-1@stranger.example") is None              # a stranger: not tracked
    assert await regarding(pool, org, "moved-2@customer.example") == (None, None)      # Bea's: tracked, regarding nothing
    created = await read_topic(settings, "activity.created", 2)

    await asyncio.to_thread(_move_all, dovecot, box, "Projects", "Acme")
    await pipeline(settings)

    assert await regarding(pool, org, "moved-1@stranger.example") == ("account", acme.id)
    assert await regarding(pool, org, "moved-2@customer.example") == ("account", acme.id)
    assert await regarding(pool, org, "other-1@stranger.example") == ("account", acme.id)
    for message_id in ("moved-1@stranger.example", "moved-2@customer.example"):
        assert [(d.tracked, d.reason) for d in await registry.decisions(org, message_id)] == \
            [(True, "tracked_folder_rule")], message_id
    created = await read_topic(settings, "activity.created", len(created) + 1)
    assert sorted(e["data"]["message_id"] for e in created) == \
        ["moved-1@stranger.example", "moved-2@customer.example", "other-1@stranger.example"]
    updated = await read_topic(settings, "activity.updated", 1)
    assert [(e["data"]["message_id"], e["data"]["regarding"], e["data"]["previous_regarding"], e["data"]["folder"])
            for e in updated] == [("moved-2@customer.example", {"kind": "account", "id": str(acme.id)}, None, "Acme")]

    # Nothing more on the next poll: the new place is recorded, so the move is announced once.
    await pipeline(settings)
    assert len(await read_topic(settings, "activity.updated", 1)) == 1
    assert len(await read_topic(settings, "activity.created", 3)) == 3


@pytest.mark.parametrize("first", ["ann", "bob"])
async def test_an_activity_read_again_from_another_mailboxs_mapped_folder_regards_its_record(
        settings, registry: Registry, org, dovecot, pool, first: str) -> None:
    """One message reaches two mailboxes: Ann tracks all her mail (an activity regarding nothing);
    Bob's server files it into a folder mapped to Acme.  Whichever is read first, the activity ends
    regarding Acme: the folder rule comes before *already tracked* (read after Ann's, Bob's rule
    re-files the activity, and `activity.updated` says so)."""
    await registry.add_profile(org, imap_profile(dovecot))
    acme = await registry.add_record(org, "account", "Acme", "info@acme.example")
    ann = await ready_mailbox(registry, org, dovecot, tracking="all")
    bob = await ready_mailbox(registry, org, dovecot, tracking="known_records", tracked_folders=["INBOX"])
    await registry.add_folder_rule(org, bob.email, "Acme", f"account:{acme.id}")
    shared = message("Order 21", sender="buyer@stranger.example", message_id="<both-1@stranger.example>")
    deliveries = {"ann": (ann, "INBOX"), "bob": (bob, "Acme")}
    for name in (first, "bob" if first == "ann" else "ann"):   # each read and evaluated on its own
        box, folder = deliveries[name]
        await dovecot.append(box.email, box.password, shared, folder=folder)
        await pipeline(settings)

    assert await regarding(pool, org, "both-1@stranger.example") == ("account", acme.id)
    reasons = {d.mailbox_id: d.reason for d in await registry.decisions(org, "both-1@stranger.example")}
    assert reasons == {bob.id: "tracked_folder_rule",
                       ann.id: "tracked_all" if first == "ann" else "already_tracked"}, reasons
    async with pool.acquire() as conn:
        linked = await conn.fetchval("SELECT count(*) FROM email_activity_mailbox l JOIN email_activity a ON a.id = l.activity_id "
                                     "WHERE a.organization_id = $1 AND a.message_id = 'both-1@stranger.example'", org.id)
    assert linked == 2
    assert len(await read_topic(settings, "activity.created", 1)) == 1
    updated = await read_topic(settings, "activity.updated", 1 if first == "ann" else 0, timeout=5 if first == "bob" else 15)
    assert len(updated) == (1 if first == "ann" else 0), updated


def _move_all(dovecot, box, source: str, target: str) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=30) as imap:
        imap.login(box.email, box.password)
        imap.select(source)
        typ, data = imap.uid("MOVE", "1:*", target)
        assert typ == "OK", data
        imap.logout()
