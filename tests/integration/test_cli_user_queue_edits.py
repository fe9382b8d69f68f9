"""Everyday edits of users, queues and a mailbox's approval from the command line, as Dynamics 365's
user and queue forms and its Approve Email / Reject Email actions make them.

Each command runs as a user runs it (a subprocess) against the session's PostgreSQL; its effect is
read back from the registry and from `mailboxes_to_process`, the one query the services ask what to
work.  The last test runs ingest against Dovecot: a deactivated user's mailbox is not read.
"""
from __future__ import annotations

import json
import uuid

import asyncpg
import pytest
from pydantic import SecretStr

from shared.errors import InvalidInput, NotFound
from shared.registry.models import Organization
from shared.registry.service import ProfileInput, Registry
from shared.settings import Settings
from tests.support.cli import conduit_cli
from tests.support.inbound import ingest_running
from tests.support.mailboxes import imap_profile, message, ready_mailbox
from tests.support.waiting import eventually


async def _ok(settings: Settings, org: Organization, *args: str) -> str:
    """``conduit ARGS --org ORG``'s one line of output; it must succeed."""
    code, out, err = await conduit_cli(settings, *args, "--org", org.name)
    assert code == 0 and "Traceback" not in err, f"conduit {' '.join(args)} failed ({code}): {out}{err}"
    return out.strip()


async def _profile(registry: Registry, org: Organization) -> None:
    await registry.add_profile(org, ProfileInput(name="corp", server_type="imap", incoming_host="127.0.0.1",
                                                 incoming_port=10143, incoming_tls="none", outgoing_port=10025,
                                                 outgoing_tls="none"))


async def _ready(registry: Registry, org: Organization, email: str, *, queue: bool = False) -> None:
    """A user's (or queue's) mailbox with credentials, approved, Test & Enable passed both ways."""
    if queue:
        await registry.add_queue(org, f"Queue {email}", email)
    else:
        await registry.add_user(org, f"User {email}", email)
    await registry.set_credentials(org, email, None, SecretStr("pw"))
    mailbox = await registry.update_mailbox(org, email, email_approved=True)
    for direction in ("incoming", "outgoing"):
        await registry.record_test(mailbox.id, direction, True, "ok")


async def _processed(registry: Registry, org: Organization, email: str) -> list[str]:
    """The directions the services would work the mailbox of ``email`` for now."""
    mailbox = await registry.mailbox(org, email)
    return [d for d in ("incoming", "outgoing")
            if [w.id for w in await registry.mailboxes_to_process(d, organization_id=org.id)] == [mailbox.id]]


async def _changes(pool: asyncpg.Pool, key: object) -> list[dict]:
    """The data of the `registry.changes` events recorded for ``key`` (an entity id), oldest first."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT payload FROM event_outbox WHERE topic = 'registry.changes' AND key = $1 "
                                "ORDER BY id", str(key))
    return [(json.loads(r["payload"]) if isinstance(r["payload"], str) else r["payload"])["data"] for r in rows]


async def _mailbox_codes(pool: asyncpg.Pool, mailbox_id: object) -> list[str | None]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT payload FROM event_outbox WHERE topic = 'mailbox.events' AND key = $1 "
                                "ORDER BY id", str(mailbox_id))
    return [(json.loads(r["payload"]) if isinstance(r["payload"], str) else r["payload"])["data"].get("code")
            for r in rows]


# --- users -------------------------------------------------------------------------------------------

async def test_a_users_new_address_is_its_mailboxs_which_must_be_approved_and_tested_again(
        settings: Settings, registry: Registry, org: Organization, pool: asyncpg.Pool) -> None:
    await _profile(registry, org)
    await _ready(registry, org, "ann@example.com")
    mailbox = await registry.mailbox(org, "ann@example.com")
    assert await _processed(registry, org, "ann@example.com") == ["incoming", "outgoing"]

    line = await _ok(settings, org, "user", "set", "ann@example.com", "--email", "ann.lee@example.com")
    assert line == ("user ann@example.com changed: address now ann.lee@example.com; its mailbox's address too: "
                    "approval withdrawn, Test & Enable reset (incoming, outgoing); its mailbox is not processed: its "
                    "address is not approved (`conduit mailbox approve ann.lee@example.com`), and Test & Enable has "
                    "not succeeded for incoming, outgoing (`conduit mailbox test-enable ann.lee@example.com`)")
    [user] = await registry.users(org)
    assert user.email == "ann.lee@example.com" and user.mailbox_id == mailbox.id
    moved = await registry.mailbox(org, "ann.lee@example.com")
    assert moved.id == mailbox.id and moved.email == "ann.lee@example.com" and not moved.email_approved
    assert moved.username == "ann.lee@example.com" and moved.has_credentials   # the default sign-in name follows
    assert moved.incoming.status == moved.outgoing.status == "not_run"
    assert await _processed(registry, org, "ann.lee@example.com") == []
    with pytest.raises(NotFound):
        await registry.mailbox(org, "ann@example.com")
    assert {"entity": "user", "entity_id": str(user.id), "change": "updated",
            "fields": {"email": "ann.lee@example.com"}} in await _changes(pool, user.id)
    assert {"entity": "mailbox", "entity_id": str(mailbox.id), "change": "updated",
            "fields": {"email": "ann.lee@example.com", "email_approved": False}} in await _changes(pool, mailbox.id)
    codes = await _mailbox_codes(pool, mailbox.id)
    assert "address_changed" in codes and "tests_reset" in codes

    # Approved and tested again, it is processed again.
    assert await _ok(settings, org, "mailbox", "approve", "ann.lee@example.com") == \
        "ann.lee@example.com: email address approved"
    for direction in ("incoming", "outgoing"):
        await registry.record_test(mailbox.id, direction, True, "ok")
    assert await _processed(registry, org, "ann.lee@example.com") == ["incoming", "outgoing"]

    # The same address in other letters is the same mailbox: written, approval and tests kept.
    line = await _ok(settings, org, "user", "set", "ann.lee@example.com", "--email", "Ann.Lee@example.com")
    assert line == ("user ann.lee@example.com changed: address now Ann.Lee@example.com; "
                    "its mailbox is processed (incoming, outgoing)")
    assert (await registry.mailbox(org, "ann.lee@example.com")).email == "Ann.Lee@example.com"
    assert await _processed(registry, org, "Ann.Lee@example.com") == ["incoming", "outgoing"]
    assert await _ok(settings, org, "user", "set", "ann.lee@example.com", "--email", "Ann.Lee@example.com") == \
        "user Ann.Lee@example.com: already so, nothing changed"


async def test_a_users_delivery_methods_decide_the_directions_its_mailbox_is_processed_for(
        settings: Settings, registry: Registry, org: Organization) -> None:
    await _profile(registry, org)
    await _ready(registry, org, "ann@example.com")

    assert await _ok(settings, org, "user", "set", "ann@example.com", "--incoming", "none") == \
        "user ann@example.com changed: incoming server_side_sync -> none; its mailbox is processed (outgoing)"
    assert await _processed(registry, org, "ann@example.com") == ["outgoing"]
    assert await _ok(settings, org, "user", "set", "ann@example.com", "--outgoing", "none") == (
        "user ann@example.com changed: outgoing server_side_sync -> none; its mailbox is not processed: the user "
        "uses server-side sync for no direction (`conduit user set ann@example.com --outgoing server_side_sync`)")
    assert await _processed(registry, org, "ann@example.com") == []
    line = await _ok(settings, org, "user", "set", "ann@example.com", "--incoming", "server_side_sync",
                     "--outgoing", "server_side_sync", "--json")
    edit = json.loads(line)
    assert edit["user"]["incoming_method"] == edit["user"]["outgoing_method"] == "server_side_sync"
    assert edit["changed"] == {"incoming_method": ["none", "server_side_sync"],
                               "outgoing_method": ["none", "server_side_sync"]}
    assert edit["processed"] == ["incoming", "outgoing"] and edit["mailbox"]["email"] == "ann@example.com"
    assert await _processed(registry, org, "ann@example.com") == ["incoming", "outgoing"]

    # A user without a mailbox gets one on the default profile once it uses server-side sync.
    await registry.add_user(org, "Bob", "bob@example.com", incoming="none", outgoing="none")
    assert [u.mailbox_id for u in await registry.users(org) if u.email == "bob@example.com"] == [None]
    line = await _ok(settings, org, "user", "set", "bob@example.com", "--incoming", "server_side_sync")
    assert line.startswith("user bob@example.com changed: incoming none -> server_side_sync; its mailbox "
                           "bob@example.com was created on the profile corp; its mailbox is not processed: "), line
    assert "`conduit mailbox approve bob@example.com`" in line
    created = await registry.mailbox(org, "bob@example.com")
    assert created.profile_name == "corp" and created.owner_kind == "user" and not created.email_approved


async def test_a_deactivated_user_s_mailbox_is_not_processed_until_the_user_is_activated(
        settings: Settings, registry: Registry, org: Organization, pool: asyncpg.Pool) -> None:
    await _profile(registry, org)
    await _ready(registry, org, "ann@example.com")

    assert await _ok(settings, org, "user", "deactivate", "ann@example.com") == \
        "user ann@example.com: deactivated; its mailbox ann@example.com is not processed while the user is inactive"
    [user] = await registry.users(org)
    assert not user.active and await _processed(registry, org, "ann@example.com") == []
    assert {"entity": "user", "entity_id": str(user.id), "change": "updated",
            "fields": {"active": False}} in await _changes(pool, user.id)
    assert await _ok(settings, org, "user", "deactivate", "ann@example.com") == \
        "user ann@example.com: inactive already; nothing changed"

    assert await _ok(settings, org, "user", "activate", str(user.id)) == \
        "user ann@example.com: activated; its mailbox is processed (incoming, outgoing)"
    assert (await registry.users(org))[0].active and \
        await _processed(registry, org, "ann@example.com") == ["incoming", "outgoing"]
    assert await _ok(settings, org, "user", "activate", "ann@example.com") == \
        "user ann@example.com: active already; nothing changed"

    # Activated while its mailbox is not approved: the line says what it still waits for.
    await _ok(settings, org, "user", "deactivate", "ann@example.com")
    await _ok(settings, org, "mailbox", "reject", "ann@example.com")
    assert await _ok(settings, org, "user", "activate", "ann@example.com") == (
        "user ann@example.com: activated; its mailbox is not processed: its address is not approved "
        "(`conduit mailbox approve ann@example.com`)")


# --- queues ------------------------------------------------------------------------------------------

async def test_a_queues_address_methods_and_active_flag(
        settings: Settings, registry: Registry, org: Organization, pool: asyncpg.Pool) -> None:
    await _profile(registry, org)
    await _ready(registry, org, "support@example.com", queue=True)
    mailbox = await registry.mailbox(org, "support@example.com")

    # By its name, as `queue list` shows it first.
    line = await _ok(settings, org, "queue", "set", "Queue support@example.com", "--email", "help@example.com")
    assert line.startswith("queue support@example.com changed: address now help@example.com; its mailbox's "
                           "address too: approval withdrawn, Test & Enable reset (incoming, outgoing); its mailbox "
                           "is not processed: its address is not approved"), line
    [queue] = await registry.queues(org)
    assert queue.email == "help@example.com"
    moved = await registry.mailbox(org, "help@example.com")
    assert moved.id == mailbox.id and not moved.email_approved and moved.incoming.status == "not_run"
    assert {"entity": "queue", "entity_id": str(queue.id), "change": "updated",
            "fields": {"email": "help@example.com"}} in await _changes(pool, queue.id)
    await registry.update_mailbox(org, "help@example.com", email_approved=True)
    for direction in ("incoming", "outgoing"):
        await registry.record_test(mailbox.id, direction, True, "ok")

    assert await _ok(settings, org, "queue", "set", "help@example.com", "--outgoing", "none") == \
        "queue help@example.com changed: outgoing server_side_sync -> none; its mailbox is processed (incoming)"
    assert await _processed(registry, org, "help@example.com") == ["incoming"]
    assert json.loads(await _ok(settings, org, "queue", "set", "help@example.com", "--outgoing", "none", "--json")) \
        ["changed"] == {}

    assert await _ok(settings, org, "queue", "deactivate", "help@example.com") == \
        "queue help@example.com: deactivated; its mailbox help@example.com is not processed while the queue is inactive"
    assert not (await registry.queues(org))[0].active and await _processed(registry, org, "help@example.com") == []
    assert await _ok(settings, org, "queue", "activate", "help@example.com") == \
        "queue help@example.com: activated; its mailbox is processed (incoming)"
    assert await _processed(registry, org, "help@example.com") == ["incoming"]


# --- a mailbox's approval -----------------------------------------------------------------------------

async def test_mailbox_reject_withdraws_the_approval_and_approve_gives_it_back(
        settings: Settings, registry: Registry, org: Organization, pool: asyncpg.Pool) -> None:
    await _profile(registry, org)
    await _ready(registry, org, "ann@example.com")
    mailbox = await registry.mailbox(org, "ann@example.com")

    assert await _ok(settings, org, "mailbox", "reject", "ann@example.com") == \
        "ann@example.com: email address approval withdrawn; it is not processed until " \
        "`conduit mailbox approve ann@example.com`"
    assert not (await registry.mailbox(org, "ann@example.com")).email_approved
    assert await _processed(registry, org, "ann@example.com") == []
    assert await _ok(settings, org, "mailbox", "reject", "ann@example.com") == \
        "ann@example.com: email address not approved already; nothing changed"
    assert await _mailbox_codes(pool, mailbox.id)   # recorded on mailbox.events, as every mailbox edit

    await _ok(settings, org, "mailbox", "approve", "ann@example.com")
    assert await _processed(registry, org, "ann@example.com") == ["incoming", "outgoing"]


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (("user", "set", "nobody@example.com", "--incoming", "none"), "no user 'nobody@example.com'"),
    (("user", "activate", "nobody@example.com"), "no user 'nobody@example.com'"),
    (("queue", "deactivate", "nobody"), "no queue 'nobody'"),
    (("user", "set", "ann@example.com", "--email", "bob@example.com"), "a user with the address bob@example.com already exists"),
    (("user", "set", "ann@example.com", "--email", "fwd@example.com"), "fwd@example.com is already the address of a forward mailbox"),
    (("queue", "set", "support@example.com", "--email", "ann@example.com"), "ann@example.com is already the address of user"),
    (("user", "set", "ann@example.com", "--email", "not-an-address"), "not a valid email address"),
    (("user", "set", "ann@example.com", "--incoming", "bogus"), "Invalid value for '--incoming'"),
    (("queue", "set", "support@example.com", "--outgoing", "forward_mailbox"),
     "'forward_mailbox' is not one of 'none', 'server_side_sync'"),
    (("user", "set", "ann@example.com"), "nothing to change (see `conduit user set --help`)"),
    (("mailbox", "reject", "nobody@example.com"), "no mailbox 'nobody@example.com'"),
])
async def test_bad_input_is_one_line_and_exit_code_2(settings: Settings, registry: Registry, org: Organization,
                                                    args: tuple[str, ...], says: str) -> None:
    await _profile(registry, org)
    await registry.add_user(org, "Ann", "ann@example.com")
    await registry.add_user(org, "Bob", "bob@example.com")
    await registry.add_queue(org, "Support", "support@example.com")
    await registry.add_forward_mailbox(org, "Forward", "fwd@example.com")
    before = [u.model_dump() for u in await registry.users(org)] + [q.model_dump() for q in await registry.queues(org)]

    code, out, err = await conduit_cli(settings, *args, "--org", org.name)
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("error: ") and says in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert before == [u.model_dump() for u in await registry.users(org)] + \
        [q.model_dump() for q in await registry.queues(org)]   # nothing changed


async def test_the_registry_checks_a_method_itself(registry: Registry, org: Organization) -> None:
    """The CLI's option types refuse a bad method first; the admin API will rely on the service alone."""
    await registry.add_queue(org, "Support", "support@example.com")
    with pytest.raises(InvalidInput, match="'forward_mailbox' is no outgoing delivery method: choose from none, "
                                           "server_side_sync"):
        await registry.update_queue(org, "Support", outgoing_method="forward_mailbox")
    with pytest.raises(InvalidInput, match="is no incoming delivery method"):
        await registry.update_user(org, "support@example.com", incoming_method="imap")


# --- end to end: ingest ------------------------------------------------------------------------------

async def test_ingest_does_not_read_a_deactivated_users_mailbox(
        settings: Settings, registry: Registry, org: Organization, dovecot, pool: asyncpg.Pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot, name=f"p-{uuid.uuid4().hex[:6]}"), make_default=True)
    off = await ready_mailbox(registry, org, dovecot)
    on = await ready_mailbox(registry, org, dovecot)
    assert "deactivated" in await _ok(settings, org, "user", "deactivate", off.email)
    dovecot.deliver(off.email, message("for the inactive user", to=off.email))
    dovecot.deliver(on.email, message("for the active user", to=on.email))

    async def ingested(mailbox_id: uuid.UUID) -> int:
        async with pool.acquire() as conn:
            return await conn.fetchval("SELECT count(*) FROM ingested_message WHERE mailbox_id = $1", mailbox_id)

    async def leased(mailbox_id: uuid.UUID) -> bool:
        async with pool.acquire() as conn:
            return await conn.fetchval("SELECT count(*) FROM mailbox_lease WHERE mailbox_id = $1", mailbox_id) > 0

    async with ingest_running(settings):
        # Ingest has worked the registry's mailboxes once it read the active user's mail: the
        # inactive user's was never taken (no lease), its mail never read.
        await eventually(lambda: ingested(on.id), what="the active user's mail ingested")
        assert await ingested(off.id) == 0 and not await leased(off.id)
        assert "activated" in await _ok(settings, org, "user", "activate", off.email)
        await eventually(lambda: ingested(off.id), what="the reactivated user's mail ingested")
