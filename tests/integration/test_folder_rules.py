"""Folder-level tracking rules in the registry, against the real embedded PostgreSQL: what a rule
may map, the folder it adds to the tracked ones, and the `conduit mailbox folder-rule` commands.
(That evaluate follows them is tests/e2e/test_folder_tracking.py.)"""
from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from shared.errors import Conflict, InvalidInput, NotFound
from shared.registry.service import ProfileInput, Registry
from tests.support.cli import conduit_cli

IMAP = ProfileInput(name="imap", server_type="imap", incoming_host="127.0.0.1", incoming_port=143, incoming_tls="none",
                    outgoing_port=25, outgoing_tls="none")


def _addr(tag: str = "u") -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}@example.com"


async def _user_mailbox(registry: Registry, org) -> str:
    return (await registry.add_user(org, "Ann", _addr())).email


async def test_a_rule_maps_a_folder_to_a_record_and_tracks_the_folder(registry: Registry, org) -> None:
    await registry.add_profile(org, IMAP)
    email = await _user_mailbox(registry, org)
    acme = await registry.add_record(org, "account", "Acme", _addr("acme"))

    rule, added = await registry.add_folder_rule(org, email, "Customers/Acme", f"account:{acme.email.upper()}")
    assert (rule.folder, rule.regarding_kind, rule.regarding_id, rule.regarding_name) == \
        ("Customers/Acme", "account", acme.id, "Acme")
    assert added
    mailbox = await registry.mailbox(org, email)
    assert mailbox.tracked_folders == ["INBOX", "Customers/Acme"]
    assert [(r.folder, r.regarding_id) for r in mailbox.folder_rules] == [("Customers/Acme", acme.id)]

    # A folder tracked already stays as it is; a record named by its id works as by its address.
    await registry.update_mailbox(org, email, tracked_folders=["INBOX", "Projects"])
    rule, added = await registry.add_folder_rule(org, email, "Projects", f"account:{acme.id}")
    assert not added and (await registry.mailbox(org, email)).tracked_folders == ["INBOX", "Projects"]
    assert [r.folder for r in await registry.folder_rules(org, email)] == ["Customers/Acme", "Projects"]

    with pytest.raises(Conflict, match=r"'Projects' .* is already mapped to account"):
        await registry.add_folder_rule(org, email, "Projects", f"account:{acme.id}")

    removed = await registry.remove_folder_rule(org, email, "Projects")
    assert removed.folder == "Projects"
    assert [r.folder for r in await registry.folder_rules(org, email)] == ["Customers/Acme"]
    assert (await registry.mailbox(org, email)).tracked_folders == ["INBOX", "Projects"]   # still tracked
    with pytest.raises(NotFound, match="no folder-level tracking rule for the folder 'Projects'"):
        await registry.remove_folder_rule(org, email, "Projects")


async def test_a_rule_takes_the_tracked_folders_spelling_and_a_case_only_difference_is_refused(registry: Registry,
                                                                                                org) -> None:
    """Ingest names a message's folder as the tracked folders spell it, and evaluate finds the rule by
    that name: a rule typed another way must be stored their way, or refused."""
    await registry.add_profile(org, IMAP)
    email = await _user_mailbox(registry, org)
    acme = await registry.add_record(org, "account", "Acme", _addr("acme"))
    await registry.update_mailbox(org, email, tracked_folders=["INBOX", "Inbox/Acme", "Projects"])

    rule, added = await registry.add_folder_rule(org, email, "INBOX/Acme", f"account:{acme.id}")
    assert (rule.folder, added) == ("Inbox/Acme", False)   # the Inbox's name is case-insensitive, below it too
    with pytest.raises(InvalidInput, match="tracks 'Projects', not 'projects': folder names are case-sensitive"):
        await registry.add_folder_rule(org, email, "projects", f"account:{acme.id}")
    assert (await registry.mailbox(org, email)).tracked_folders == ["INBOX", "Inbox/Acme", "Projects"]
    assert (await registry.remove_folder_rule(org, email, "inbox/Acme")).folder == "Inbox/Acme"


async def test_what_a_rule_cannot_map_is_refused_clearly(registry: Registry, org, pool: asyncpg.Pool) -> None:
    await registry.add_profile(org, IMAP)
    email = await _user_mailbox(registry, org)
    bea = await registry.add_record(org, "contact", "Bea", _addr("bea"))
    other_org = await registry.add_organization(f"org-{uuid.uuid4().hex[:12]}")
    stranger = await registry.add_record(other_org, "contact", "Stranger", _addr("s"))
    forward = (await registry.add_forward_mailbox(org, "Forward", _addr("fwd"))).email
    pop = await registry.add_profile(org, ProfileInput(name="pop", server_type="pop3", incoming_host="127.0.0.1",
                                                       incoming_port=110, incoming_tls="none"))
    pop_user = await _user_mailbox(registry, org)
    await registry.update_mailbox(org, pop_user, profile=pop.name)

    for mailbox, folder, record, error, message in [
        (email, "Deals", f"contact:{stranger.id}", NotFound, "no contact .* in this organization"),
        (email, "Deals", f"account:{bea.id}", NotFound, "no account"),          # the id is a contact's
        (email, "Deals", "opportunity:x", InvalidInput, "KIND:ID or KIND:ADDRESS"),
        (email, "Deals", "bea@customer.example", InvalidInput, "KIND:ID or KIND:ADDRESS"),
        (email, "INBOX", f"contact:{bea.id}", InvalidInput, "the Inbox cannot be mapped"),
        (email, "inbox", f"contact:{bea.id}", InvalidInput, "the Inbox cannot be mapped"),
        (email, " ", f"contact:{bea.id}", InvalidInput, "cannot be empty"),
        (email, "Deals\r\nX", f"contact:{bea.id}", InvalidInput, "control characters"),
        (email, "Deals/*", f"contact:{bea.id}", InvalidInput, "wildcards"),
        (forward, "Deals", f"contact:{bea.id}", InvalidInput, "forward mailbox"),
        (pop_user, "Deals", f"contact:{bea.id}", InvalidInput, "POP3, which has no folders"),
        ("nobody@example.com", "Deals", f"contact:{bea.id}", NotFound, "no mailbox"),
    ]:
        with pytest.raises(error, match=message):
            await registry.add_folder_rule(org, mailbox, folder, record)
    assert await registry.folder_rules(org, email) == []
    assert (await registry.mailbox(org, email)).tracked_folders == ["INBOX"]   # nothing half-done


async def test_rules_go_with_their_mailbox_and_their_record(registry: Registry, org, pool: asyncpg.Pool) -> None:
    await registry.add_profile(org, IMAP)
    email = await _user_mailbox(registry, org)
    acme = await registry.add_record(org, "account", "Acme", _addr("acme"))
    lee = await registry.add_record(org, "lead", "Lee", _addr("lee"))
    await registry.add_folder_rule(org, email, "Acme", f"account:{acme.id}")
    await registry.add_folder_rule(org, email, "Lee", f"lead:{lee.email}")
    mailbox = await registry.mailbox(org, email)
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM crm_record WHERE id = $1", lee.id)
        assert [r.folder for r in await registry.folder_rules(org, email)] == ["Acme"]
        await conn.execute("DELETE FROM mailbox WHERE id = $1", mailbox.id)
        assert await conn.fetchval("SELECT count(*) FROM folder_tracking_rule WHERE mailbox_id = $1", mailbox.id) == 0


async def test_folder_rule_commands(settings, registry: Registry, org) -> None:
    await registry.add_profile(org, IMAP)
    email = await _user_mailbox(registry, org)
    acme = await registry.add_record(org, "account", "Acme Ltd", _addr("acme"))

    code, out, err = await conduit_cli(settings, "mailbox", "folder-rule", "add", email, "Customers/Acme",
                                       f"account:{acme.email}", "--org", org.name)
    assert code == 0, err
    assert f"tracked regarding account {acme.email} ({acme.id})" in out
    assert "was not tracked; added to the mailbox's tracked folders" in out
    assert "the email already in it is filed at the folder's next sync" in out

    code, out, err = await conduit_cli(settings, "mailbox", "folder-rule", "list", email, "--org", org.name, "--json")
    assert code == 0 and [(r["folder"], r["regarding_id"]) for r in json.loads(out)] == [("Customers/Acme", str(acme.id))]
    code, out, err = await conduit_cli(settings, "mailbox", "folder-rule", "list", email, "--org", org.name)
    assert code == 0 and "Customers/Acme" in out and "Acme Ltd" in out
    assert "filed at the folder's next sync" in out, out   # the mail already in the folder, not read yet

    code, out, err = await conduit_cli(settings, "mailbox", "show", email, "--org", org.name)
    assert code == 0 and "INBOX, Customers/Acme" in out
    assert f"folder rule Customers/Acme  regarding account {acme.email} ({acme.id})" in out, out
    code, out, err = await conduit_cli(settings, "mailbox", "show", email, "--org", org.name, "--json")
    assert [r["folder"] for r in json.loads(out)["folder_rules"]] == ["Customers/Acme"]

    code, out, err = await conduit_cli(settings, "mailbox", "folder-rule", "add", email, "INBOX",
                                       f"account:{acme.id}", "--org", org.name)
    assert code == 2 and err.startswith("error: the Inbox cannot be mapped") and len(err.strip().splitlines()) == 1, err

    code, out, err = await conduit_cli(settings, "mailbox", "configure", email, "--folders", "INBOX", "--org", org.name)
    assert code == 0 and "warning: the folder Customers/Acme has a folder-level tracking rule but is no longer tracked" in err
    code, out, err = await conduit_cli(settings, "mailbox", "folder-rule", "remove", email, "Customers/Acme", "--org", org.name)
    assert code == 0 and "no longer tracked regarding account" in out and "stays tracked" in out, (out, err)
    code, out, err = await conduit_cli(settings, "mailbox", "folder-rule", "remove", email, "Customers/Acme", "--org", org.name)
    assert code != 0 and "no folder-level tracking rule" in err and "Traceback" not in err, err
