"""The registry against the real embedded PostgreSQL: constraints, auto-linking, and every
exclusion of mailboxes_to_process()."""
from __future__ import annotations

import asyncio
import itertools
import json
import uuid

import asyncpg
import pytest
from pydantic import SecretStr

from shared.errors import Conflict, InvalidInput, NotFound
from shared.registry import repository as repo
from shared.registry.service import ProfileInput, Registry
from tests.support.waiting import eventually

IMAP = ProfileInput(name="imap", server_type="imap", incoming_host="127.0.0.1", incoming_port=143, incoming_tls="none",
                    outgoing_port=25, outgoing_tls="none")


def _addr(tag: str = "u") -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}@example.com"


async def test_first_profile_becomes_the_only_default(registry: Registry, org) -> None:
    first = await registry.add_profile(org, IMAP)
    second = await registry.add_profile(org, ProfileInput(**{**IMAP.__dict__, "name": "second"}))
    assert first.is_default and not second.is_default
    await registry.set_default_profile(org, "second")
    defaults = [p.name for p in await registry.profiles(org) if p.is_default]
    assert defaults == ["second"]


async def test_user_on_server_side_sync_gets_a_mailbox_on_the_default_profile(registry: Registry, org) -> None:
    profile = await registry.add_profile(org, IMAP)
    user = await registry.add_user(org, "Ann", _addr())
    mailbox = await registry.mailbox(org, user.email)
    assert mailbox.profile_id == profile.id and mailbox.owner_kind == "user" and mailbox.owner_id == user.id
    queue = await registry.add_queue(org, "Support", _addr("q"))
    assert (await registry.mailbox(org, queue.email)).profile_id == profile.id


async def test_user_without_server_side_sync_gets_no_mailbox(registry: Registry, org) -> None:
    await registry.add_profile(org, IMAP)
    user = await registry.add_user(org, "Ann", _addr(), incoming="none", outgoing="none", act="none")
    assert user.mailbox_id is None


async def test_without_default_profile_the_mailbox_gets_an_error_alert_and_is_linked_later(registry: Registry, org) -> None:
    user = await registry.add_user(org, "Ann", _addr())
    mailbox = await registry.mailbox(org, user.email)
    assert mailbox.profile_id is None
    assert [(a.severity, a.code) for a in mailbox.alerts] == [("error", "no_default_profile")]
    profile = await registry.add_profile(org, IMAP)
    assert (await registry.mailbox(org, user.email)).profile_id == profile.id


async def test_a_user_has_at_most_one_mailbox(registry: Registry, org, pool: asyncpg.Pool) -> None:
    await registry.add_profile(org, IMAP)
    user = await registry.add_user(org, "Ann", _addr())
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.UniqueViolationError):
            await repo.insert_mailbox(conn, {"organization_id": org.id, "name": "x", "email": _addr(), "owner_user_id": user.id})
    queue = await registry.add_queue(org, "Q", _addr("q"))
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.UniqueViolationError):
            await repo.insert_mailbox(conn, {"organization_id": org.id, "name": "x", "email": _addr(), "owner_queue_id": queue.id})
        with pytest.raises(asyncpg.CheckViolationError):  # never both owners
            await repo.insert_mailbox(conn, {"organization_id": org.id, "name": "x", "email": _addr(),
                                             "owner_user_id": uuid.uuid4(), "owner_queue_id": queue.id})


async def test_clear_errors_for_bad_input(registry: Registry, org) -> None:
    with pytest.raises(InvalidInput, match="not a valid email address"):
        await registry.add_user(org, "Ann", "not-an-address")
    email = _addr()
    await registry.add_user(org, "Ann", email)
    with pytest.raises(Conflict):
        await registry.add_user(org, "Ann again", email.upper())
    with pytest.raises(NotFound):
        await registry.mailbox(org, "nobody@example.com")
    with pytest.raises(InvalidInput, match="incoming-host"):
        await registry.add_profile(org, ProfileInput(name="p", server_type="imap"))
    with pytest.raises(InvalidInput, match="only a queue"):
        await registry.update_mailbox(org, email, delete_after_processing=True)
    # URLs that carry credentials are https (http only on the loopback, for a local simulator).
    with pytest.raises(InvalidInput, match="--service-url must be an https:// URL"):
        await registry.add_profile(org, ProfileInput(name="ews", server_type="exchange_server",
                                                     service_url="http://mail.example.com/EWS/Exchange.asmx"))
    with pytest.raises(InvalidInput, match="--oauth-token-url must be an https:// URL"):
        await registry.add_profile(org, ProfileInput(
            name="o365", server_type="exchange_online", service_url="https://graph.microsoft.com/v1.0",
            auth_method="oauth2", oauth_token_url="http://login.example.com/token", oauth_client_id="c",
            oauth_client_secret=SecretStr("s")))
    await registry.add_profile(org, ProfileInput(name="sim", server_type="exchange_server",
                                                 service_url="http://127.0.0.1:8080/EWS/Exchange.asmx"))


async def test_credentials_are_encrypted_at_rest(registry: Registry, org, pool: asyncpg.Pool) -> None:
    await registry.add_profile(org, IMAP)
    user = await registry.add_user(org, "Ann", _addr())
    await registry.set_credentials(org, user.email, None, SecretStr("hunter2-very-secret"))
    async with pool.acquire() as conn:
        stored = await conn.fetchval("SELECT secret FROM mailbox WHERE owner_user_id = $1", user.id)
    assert b"hunter2" not in stored
    assert registry.cipher.decrypt(stored).get_secret_value() == "hunter2-very-secret"
    shown = (await registry.mailbox(org, user.email)).model_dump_json()
    assert "hunter2" not in shown and '"has_credentials":true' in shown


async def test_a_profile_is_edited_as_a_whole_and_its_secret_replaced_only_when_given(
        registry: Registry, org, pool: asyncpg.Pool) -> None:
    await registry.add_profile(org, ProfileInput(
        name="edit-me", server_type="imap", incoming_host="127.0.0.1", incoming_port=993,
        auth_method="profile_impersonation", profile_username="svc@example.com", profile_secret=SecretStr("first-secret")))

    async def stored_secret() -> bytes:
        async with pool.acquire() as conn:
            return await conn.fetchval("SELECT profile_secret FROM email_server_profile "
                                       "WHERE organization_id = $1 AND name = 'edited'", org.id)

    edited = await registry.update_profile(org, "edit-me", name="edited", max_concurrent_connections=2,
                                           min_polling_interval_seconds=None)
    assert (edited.name, edited.max_concurrent_connections, edited.min_polling_interval_seconds) == ("edited", 2, 60)
    kept = await stored_secret()
    assert registry.cipher.decrypt(kept).get_secret_value() == "first-secret"
    await registry.update_profile(org, "edited", profile_secret=SecretStr("second-secret"))
    rotated = await stored_secret()
    assert rotated != kept and registry.cipher.decrypt(rotated).get_secret_value() == "second-secret"
    async with pool.acquire() as conn:
        changes = [r["payload"] for r in await conn.fetch(
            "SELECT payload::text AS payload FROM event_outbox WHERE topic = 'registry.changes' AND key = $1 ORDER BY id",
            str(edited.id))]
    assert [json.loads(c)["data"]["fields"] for c in changes[-2:]] == [
        {"name": "edited", "max_concurrent_connections": 2}, {"profile_secret": "changed"}]
    assert all("second-secret" not in c and "first-secret" not in c for c in changes)

    moved = await registry.update_profile(org, "edited", incoming_host="imap2.example.com", stop_after_refused_logins=3)
    assert (moved.incoming_host, moved.outgoing_host) == ("imap2.example.com", "imap2.example.com")   # same settings
    assert (await registry.update_profile(org, "edited", clear=["stop-after-refused-logins"])).stop_after_refused_logins is None
    # An edit that changes nothing (cleared again, the same value again) is neither written nor announced.
    async with pool.acquire() as conn:
        announced = await conn.fetchval("SELECT count(*) FROM event_outbox WHERE topic = 'registry.changes'")
        await registry.update_profile(org, "edited", clear=["stop-after-refused-logins"])
        await registry.update_profile(org, "edited", max_concurrent_connections=2)
        assert await conn.fetchval("SELECT count(*) FROM event_outbox WHERE topic = 'registry.changes'") == announced

    await registry.add_profile(org, IMAP)
    for changes, error, message in [
        ({"auth_method": "oauth2"}, InvalidInput, "OAuth 2.0 needs"),    # checked as a whole, as a new one
        ({"max_concurrent_connections": 0}, InvalidInput, "--max-connections must be between 1 and 1000"),
        ({"incoming_port": 99999}, InvalidInput, "--incoming-port must be between 1 and 65535"),
        ({"name": "imap"}, Conflict, "already exists"),
        ({"colour": "red"}, InvalidInput, "unknown profile settings: colour"),
        ({"incoming_port": None}, InvalidInput, "nothing to change"),
        ({"clear": ["incoming_host"]}, InvalidInput, "needs --incoming-host"),
        ({"clear": ["profile_secret"]}, InvalidInput, "impersonation needs"),
        ({"clear": ["name"]}, InvalidInput, "cannot clear name"),
        ({"clear": ["oauth_scope"], "oauth_scope": "x"}, InvalidInput, "both set and cleared: oauth_scope"),
        ({"tls_ca_file": "/etc/passwd"}, InvalidInput, "/etc/passwd cannot be used: it holds no PEM certificate"),
        ({"tls_ca_file": "/nonexistent/ca.pem"}, InvalidInput, "ca.pem cannot be used: No such file"),
    ]:
        with pytest.raises(error, match=message):
            await registry.update_profile(org, "edited", **changes)
    with pytest.raises(NotFound, match="no email server profile"):
        await registry.update_profile(org, "missing", max_concurrent_connections=3)
    assert (await registry.profile(org, "edited")).max_concurrent_connections == 2


async def test_a_profile_edit_is_checked_against_the_row_it_writes(registry: Registry, org, pool: asyncpg.Pool) -> None:
    """An edit made while another transaction changes the profile waits for it, and is checked
    against the result: here the other one removed the IMAP host, so raising the limit is refused
    rather than written onto a profile that no longer stands."""
    profile = await registry.add_profile(org, ProfileInput(name="raced", server_type="imap",
                                                           incoming_host="127.0.0.1", incoming_port=143))
    async with pool.acquire() as other, pool.acquire() as watcher:
        tx = other.transaction()
        await tx.start()
        await other.execute("UPDATE email_server_profile SET incoming_host = NULL WHERE id = $1", profile.id)
        edit = asyncio.create_task(registry.update_profile(org, "raced", max_concurrent_connections=3))

        async def edit_waits_for_the_lock() -> bool:
            return await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%email_server_profile%'") > 0
        await eventually(edit_waits_for_the_lock, timeout=10, what="the edit to wait for the other transaction")
        await tx.commit()
        with pytest.raises(InvalidInput, match="needs --incoming-host"):
            await edit
    assert (await registry.profile(org, "raced")).max_concurrent_connections == 10


# --- mailboxes_to_process: every exclusion ---------------------------------------------------------

async def _ready_mailbox(registry: Registry, org, *, owner: str = "user") -> uuid.UUID:
    """A mailbox that qualifies for incoming and outgoing processing."""
    if owner == "user":
        email = (await registry.add_user(org, "Ann", _addr())).email
    elif owner == "queue":
        email = (await registry.add_queue(org, f"Q{uuid.uuid4().hex[:6]}", _addr("q"))).email
    else:
        email = (await registry.add_forward_mailbox(org, "Forward", _addr("fwd"))).email
    await registry.update_mailbox(org, email, email_approved=True)
    mailbox = await registry.mailbox(org, email)
    for direction in ("incoming", "outgoing"):
        await registry.record_test(mailbox.id, direction, True, "ok")
    return mailbox.id


async def _processed(registry: Registry, org, direction: str) -> set[uuid.UUID]:
    return {w.id for w in await registry.mailboxes_to_process(direction, organization_id=org.id)}


@pytest.mark.parametrize("owner", ["user", "queue", "forward"])
async def test_a_ready_mailbox_is_processed(registry: Registry, org, owner: str) -> None:
    await registry.add_profile(org, IMAP)
    mailbox_id = await _ready_mailbox(registry, org, owner=owner)
    assert mailbox_id in await _processed(registry, org, "incoming")
    # A forward mailbox only receives; it never sends.
    assert (mailbox_id in await _processed(registry, org, "outgoing")) == (owner != "forward")


EXCLUSIONS = ["inactive", "no_profile", "not_approved", "not_enabled", "test_failed", "backing_off",
              "owner_inactive", "owner_method_none"]


async def _apply(registry: Registry, org, pool: asyncpg.Pool, mailbox_id: uuid.UUID, exclusion: str, direction: str) -> None:
    async with pool.acquire() as conn:
        if exclusion == "inactive":
            await conn.execute("UPDATE mailbox SET active = false WHERE id = $1", mailbox_id)
        elif exclusion == "no_profile":
            await conn.execute("UPDATE mailbox SET profile_id = NULL WHERE id = $1", mailbox_id)
        elif exclusion == "not_approved":
            await conn.execute("UPDATE mailbox SET email_approved = false WHERE id = $1", mailbox_id)
        elif exclusion == "not_enabled":
            await conn.execute(f"UPDATE mailbox SET {direction}_status = 'not_run' WHERE id = $1", mailbox_id)
        elif exclusion == "test_failed":
            await conn.execute(f"UPDATE mailbox SET {direction}_status = 'failure' WHERE id = $1", mailbox_id)
        elif exclusion == "backing_off":
            await registry.record_failure(mailbox_id, direction, "connection_failed", "refused")
        elif exclusion == "owner_inactive":
            await conn.execute("UPDATE crm_user SET active = false WHERE id = (SELECT owner_user_id FROM mailbox WHERE id = $1)", mailbox_id)
        elif exclusion == "owner_method_none":
            await conn.execute(f"UPDATE crm_user SET {direction}_method = 'none' WHERE id = (SELECT owner_user_id FROM mailbox WHERE id = $1)", mailbox_id)


@pytest.mark.parametrize("direction", ["incoming", "outgoing"])
@pytest.mark.parametrize("exclusion", EXCLUSIONS)
async def test_each_exclusion_keeps_a_mailbox_out(registry: Registry, org, pool: asyncpg.Pool, exclusion: str, direction: str) -> None:
    await registry.add_profile(org, IMAP)
    excluded = await _ready_mailbox(registry, org)
    control = await _ready_mailbox(registry, org)
    await _apply(registry, org, pool, excluded, exclusion, direction)
    processed = await _processed(registry, org, direction)
    assert excluded not in processed and control in processed
    if exclusion in ("backing_off", "not_enabled", "test_failed", "owner_method_none"):
        # Direction-specific: the other direction is untouched.
        other = "outgoing" if direction == "incoming" else "incoming"
        assert excluded in await _processed(registry, org, other)


@pytest.mark.parametrize("pair", list(itertools.combinations(EXCLUSIONS, 2)))
async def test_every_pair_of_exclusions_keeps_a_mailbox_out(registry: Registry, org, pool: asyncpg.Pool, pair) -> None:
    await registry.add_profile(org, IMAP)
    excluded = await _ready_mailbox(registry, org)
    for exclusion in pair:
        await _apply(registry, org, pool, excluded, exclusion, "incoming")
    assert excluded not in await _processed(registry, org, "incoming")


async def test_back_off_grows_and_recovery_clears_it(registry: Registry, org, pool: asyncpg.Pool) -> None:
    await registry.add_profile(org, IMAP)
    mailbox_id = await _ready_mailbox(registry, org)
    first = await registry.record_failure(mailbox_id, "incoming", "authentication_failed", "wrong password")
    second = await registry.record_failure(mailbox_id, "incoming", "authentication_failed", "wrong password")
    assert second > first
    async with pool.acquire() as conn:
        await conn.execute("UPDATE mailbox SET incoming_backoff_until = now() - interval '1 second' WHERE id = $1", mailbox_id)
    assert mailbox_id in await _processed(registry, org, "incoming")  # back-off over: tried again
    await registry.record_success(mailbox_id, "incoming")
    mailbox = await registry.mailbox(org, str(mailbox_id))
    assert mailbox.incoming.error_count == 0 and mailbox.incoming.backoff_until is None
    assert [a.code for a in mailbox.alerts][:3] == ["recovered", "authentication_failed", "authentication_failed"]
    # mailbox.events says each failure backed the mailbox off, after its alert: what the health
    # aggregate turns into `backing_off`.
    async with pool.acquire() as conn:
        events = [_json(r["payload"])["data"] for r in await conn.fetch(
            "SELECT payload FROM event_outbox WHERE topic = 'mailbox.events' AND payload->'data'->>'mailbox_id' = $1 "
            "ORDER BY id", str(mailbox_id))]
    failures = [(e["kind"], e["code"]) for e in events if e["kind"] in ("alert", "backoff")]
    assert failures[:4] == [("alert", "authentication_failed"), ("backoff", "authentication_failed")] * 2
    assert all(e["message"].startswith("retrying after ") for e in events if e["kind"] == "backoff")


def _json(value: str | dict) -> dict:
    return json.loads(value) if isinstance(value, str) else value


async def test_a_value_out_of_the_schemas_range_is_refused_in_the_options_words(registry: Registry, org) -> None:
    """The database holds the ranges; its refusal reads as the option's, not as a constraint's name."""
    with pytest.raises(InvalidInput, match="^--token-digits must be between 4 and 12$"):
        await registry.configure_correlation(org, tracking_token_digits=99)
    with pytest.raises(InvalidInput, match="^--polling-interval must be between 1 and 86400 seconds$"):
        await registry.add_profile(org, ProfileInput(name="slow", server_type="imap", incoming_host="127.0.0.1",
                                                     incoming_port=143, min_polling_interval_seconds=0))


# --- after an audit: folders, CA file paths, host names, profile moves, duplicate records ------------

async def test_tracked_folders_lose_blanks_and_repeats_and_none_is_refused(registry: Registry, org) -> None:
    await registry.add_profile(org, IMAP)
    email = (await registry.add_user(org, "Ann", _addr())).email
    for given, kept in [(["INBOX", "", "INBOX"], ["INBOX"]),
                        ([" Projects ", "inbox", "Projects", "Sent Items", "INBOX"], ["Projects", "INBOX", "Sent Items"])]:
        assert (await registry.update_mailbox(org, email, tracked_folders=given)).tracked_folders == kept
    for given in ([], ["", " "], [",,"][0].split(",")):
        with pytest.raises(InvalidInput, match="tracks at least one folder: --folders names none"):
            await registry.update_mailbox(org, email, tracked_folders=given)
    with pytest.raises(InvalidInput, match="control characters"):
        await registry.update_mailbox(org, email, tracked_folders=["INBOX", "Bad\x00"])
    assert (await registry.mailbox(org, email)).tracked_folders == ["Projects", "INBOX", "Sent Items"]


async def test_a_relative_ca_file_is_stored_as_an_absolute_path(registry: Registry, org, tls: dict, monkeypatch) -> None:
    monkeypatch.chdir(tls["ca"].parent)
    added = await registry.add_profile(org, ProfileInput(**{**IMAP.__dict__, "name": "private-ca", "tls_ca_file": "ca.pem"}))
    assert added.tls_ca_file == str(tls["ca"])
    await registry.add_profile(org, ProfileInput(**{**IMAP.__dict__, "name": "other"}))
    edited = await registry.update_profile(org, "other", tls_ca_file=f"./{tls['ca'].name}")
    assert edited.tls_ca_file == str(tls["ca"])
    monkeypatch.chdir("/")   # read from elsewhere, the stored path still names the file
    assert (await registry.profile(org, "private-ca")).tls_ca_file == str(tls["ca"])


@pytest.mark.parametrize("host", ["imap example.com", " imap.example.com", "imap.example.com\n", "imap..example.com",
                                  "-imap.example.com", "imap.example.com:993", "http://imap.example.com", "[::1]"])
async def test_a_host_that_is_no_host_name_is_refused(registry: Registry, org, host: str) -> None:
    with pytest.raises(InvalidInput, match="is not a host name or IP address"):
        await registry.add_profile(org, ProfileInput(**{**IMAP.__dict__, "incoming_host": host}))
    await registry.add_profile(org, IMAP)
    with pytest.raises(InvalidInput, match="--outgoing-host .* is not a host name or IP address"):
        await registry.update_profile(org, "imap", outgoing_host=host)


@pytest.mark.parametrize("host", ["imap.example.com", "IMAP.Example.COM.", "mail-01.corp_internal.example", "localhost",
                                  "10.0.0.7", "::1", "fe80::1", "bücher.example"])
async def test_host_names_and_ip_addresses_are_taken(registry: Registry, org, host: str) -> None:
    assert (await registry.add_profile(org, ProfileInput(**{**IMAP.__dict__, "incoming_host": host}))).incoming_host == host


async def test_a_mailbox_moved_to_another_server_needs_test_and_enable_again(registry: Registry, org) -> None:
    await registry.add_profile(org, IMAP)
    await registry.add_profile(org, ProfileInput(**{**IMAP.__dict__, "name": "same-server"}))
    await registry.add_profile(org, ProfileInput(name="pop", server_type="pop3", incoming_host="127.0.0.1",
                                                 incoming_port=110, incoming_tls="none", outgoing_port=25,
                                                 outgoing_tls="none"))
    mailbox_id = await _ready_mailbox(registry, org)
    await registry.record_failure(mailbox_id, "incoming", "connection_failed", "refused")
    # Another profile for the very servers it was tested with: nothing to test again.
    same = await registry.update_mailbox(org, str(mailbox_id), profile="same-server")
    assert (same.incoming.status, same.outgoing.status) == ("success", "success")

    moved = await registry.update_mailbox(org, str(mailbox_id), profile="pop")
    # Another incoming server: tested again; the SMTP server is the same one: still enabled.
    assert (moved.incoming.status, moved.outgoing.status, moved.act.status) == ("not_run", "success", "not_run")
    assert moved.incoming.test_message == "not tested with the profile pop the mailbox moved to: run Test & Enable again"
    assert (moved.incoming.error_count, moved.incoming.backoff_until, moved.incoming.tested_at) == (0, None, None)
    assert mailbox_id not in await _processed(registry, org, "incoming")
    assert mailbox_id in await _processed(registry, org, "outgoing")
    await registry.record_test(mailbox_id, "incoming", True, "ok")
    assert mailbox_id in await _processed(registry, org, "incoming")


async def test_a_mailbox_edit_that_changes_nothing_is_not_announced(registry: Registry, org, pool: asyncpg.Pool) -> None:
    await registry.add_profile(org, IMAP)
    mailbox_id = await _ready_mailbox(registry, org)

    async def events() -> list[str]:
        async with pool.acquire() as conn:
            return [_json(r["payload"])["data"]["message"] for r in await conn.fetch(
                "SELECT payload FROM event_outbox WHERE topic = 'mailbox.events' "
                "AND payload->'data'->>'mailbox_id' = $1 ORDER BY id", str(mailbox_id))]

    before = await events()
    for _ in range(2):   # deactivated twice: one change
        assert not (await registry.update_mailbox(org, str(mailbox_id), active=False)).active
    now = await registry.mailbox(org, str(mailbox_id))
    await registry.update_mailbox(org, str(mailbox_id), tracking=now.tracking, tracked_folders=now.tracked_folders)
    assert (await events())[len(before):] == ["active"]
    with pytest.raises(InvalidInput, match="nothing to change"):
        await registry.update_mailbox(org, str(mailbox_id))


async def test_a_second_record_of_a_kind_with_one_address_is_refused(registry: Registry, org, pool: asyncpg.Pool) -> None:
    from services.evaluate.repository import load_lookups
    from services.evaluate.lookups import LookupKeys

    address = _addr("bea")
    lead = await registry.add_record(org, "lead", "Bea (lead)", address)
    account = await registry.add_record(org, "account", "Bea's firm", address)
    contact = await registry.add_record(org, "contact", "Bea", address.upper())
    with pytest.raises(Conflict, match=f"a contact with the address .* already exists: Bea \\({contact.id}\\)"):
        await registry.add_record(org, "contact", "Dup", address)
    other_org = await registry.add_organization(f"org-{uuid.uuid4().hex[:12]}")
    await registry.add_record(other_org, "contact", "Bea elsewhere", address)   # another organization's own

    # Kinds may share an address; a sender resolves to them in one documented order every time.
    async with pool.acquire() as conn:
        lookups = await load_lookups(conn, org.id, LookupKeys(frozenset({address}), frozenset(), frozenset(),
                                                              frozenset(), frozenset()))
    assert [(p.kind, p.id) for p in lookups.parties(address)] == \
        [("contact", str(contact.id)), ("account", str(account.id)), ("lead", str(lead.id))]


async def test_mailbox_show_and_profile_list_print_what_holds_now(settings, registry: Registry, org, pool: asyncpg.Pool) -> None:
    from tests.support.cli import conduit_cli

    await registry.add_profile(org, ProfileInput(name="no-port", server_type="imap", incoming_host="127.0.0.1",
                                                 incoming_port=143, incoming_tls="none"))
    code, out, err = await conduit_cli(settings, "profile", "list", "--org", org.name)
    assert code == 0 and "127.0.0.1:587 (starttls)" in out and "None" not in out, (out, err)

    mailbox_id = await _ready_mailbox(registry, org)
    await registry.record_failure(mailbox_id, "incoming", "connection_failed", "refused")
    code, out, err = await conduit_cli(settings, "mailbox", "show", str(mailbox_id), "--org", org.name)
    assert code == 0 and "success; errors 1; backing off until" in out, out
    code, out, err = await conduit_cli(settings, "mailbox", "list", "--org", org.name)
    assert code == 0 and "success, backing off" in out, out     # not "success" alone, while every attempt fails
    async with pool.acquire() as conn:
        await conn.execute("UPDATE mailbox SET incoming_backoff_until = now() - interval '40 seconds' WHERE id = $1",
                           mailbox_id)
    code, out, err = await conduit_cli(settings, "mailbox", "show", str(mailbox_id), "--org", org.name)
    assert code == 0 and "success; errors 1; ok" in out and "backing off" not in out, out
    code, out, err = await conduit_cli(settings, "mailbox", "list", "--org", org.name)
    assert code == 0 and "backing off" not in out, out


async def test_configure_says_what_it_kept_and_what_needs_testing_again(settings, registry: Registry, org) -> None:
    from tests.support.cli import conduit_cli

    await registry.add_profile(org, IMAP)
    await registry.add_profile(org, ProfileInput(name="elsewhere", server_type="imap", incoming_host="imap.example.com",
                                                 incoming_port=993))
    mailbox_id = await _ready_mailbox(registry, org)
    email = (await registry.mailbox(org, str(mailbox_id))).email
    code, out, err = await conduit_cli(settings, "mailbox", "configure", email, "--folders", "INBOX,,INBOX", "--org", org.name)
    assert code == 0 and out.strip() == f"{email}: already so, nothing changed; tracked folders: INBOX", (out, err)
    code, out, err = await conduit_cli(settings, "mailbox", "configure", email, "--folders", "INBOX,Projects", "--org", org.name)
    assert code == 0 and out.strip() == f"{email}: updated; tracked folders: INBOX, Projects", (out, err)
    code, out, err = await conduit_cli(settings, "mailbox", "configure", email, "--folders", " , ", "--org", org.name)
    assert code == 2 and err.strip() == "error: a mailbox tracks at least one folder: --folders names none " \
                                        "(e.g. --folders INBOX,Projects)", err
    code, out, err = await conduit_cli(settings, "mailbox", "configure", email, "--profile", "elsewhere", "--org", org.name)
    assert code == 0 and "Test & Enable results reset for incoming, outgoing" in out, (out, err)
    assert f"`conduit mailbox test-enable {email}`" in out
    code, out, err = await conduit_cli(settings, "record", "add", "contact", "dup@customer.example", "--name", "A",
                                       "--org", org.name)
    assert code == 0 and not err
    code, out, err = await conduit_cli(settings, "record", "add", "contact", "dup@customer.example", "--name", "Dup",
                                       "--org", org.name)
    assert code == 2 and err.startswith("error: a contact with the address dup@customer.example already exists"), err
    code, out, err = await conduit_cli(settings, "record", "add", "account", "dup@customer.example", "--name", "Firm",
                                       "--org", org.name)
    assert code == 0 and "warning: dup@customer.example is also the address of contact A" in err, err


async def test_an_address_conduit_could_not_send_from_is_refused_for_users_queues_and_mailboxes(registry: Registry,
                                                                                               org) -> None:
    """Dispatch writes a mailbox's address as From; outside printable ASCII before the @ it cannot
    (shared.events.fields), so the registry refuses it up front.  A contact's address is only
    matched, never sent from: it may be any address."""
    address = f"jos\u00e9-{uuid.uuid4().hex[:6]}@example.com"
    for add in (lambda: registry.add_user(org, "José", address), lambda: registry.add_queue(org, "José", address),
                lambda: registry.add_forward_mailbox(org, "José", address)):
        with pytest.raises(InvalidInput, match="outside printable ASCII before the @"):
            await add()
    assert (await registry.add_record(org, "contact", "José", address)).email == address
