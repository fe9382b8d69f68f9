"""`conduit secrets rotate` against the real PostgreSQL: every stored secret moved to the first key of
CONDUIT_SECRET_KEY, all or nothing.

Rotation covers a whole database (every organization's secrets), so each test has a database of its
own, cloned from a migrated template: the session database holds other tests' secrets under the
session's key.  The command runs as an operator runs it (a subprocess); what it stored is then read
back through the Registry, as the services read it.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from shared.crypto import CredentialCipher
from shared.db.pool import create_pool, database_url
from shared.errors import InvalidInput
from shared.registry.secrets import rotate_secrets
from shared.registry.service import MailboxWork, ProfileInput, Registry, decode_bytea
from shared.settings import Settings
from tests.support.databases import database_name, scratch_database

ROOT = Path(__file__).resolve().parents[2]
OLD, NEW, STRAY = (Fernet.generate_key().decode() for _ in range(3))


# --- a database per test ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def template(base_settings: Settings) -> AsyncIterator[str]:
    """A migrated database that each test's database is cloned from (CREATE DATABASE ... TEMPLATE)."""
    async with scratch_database(database_url(base_settings), "rotate_tpl", migrated=True) as url:
        yield database_name(url)


@pytest.fixture
async def db(base_settings: Settings, template: str) -> AsyncIterator[str]:
    async with scratch_database(database_url(base_settings), "rotate", template=template) as url:
        yield url


@pytest.fixture
async def db_pool(db: str, base_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(base_settings.model_copy(update={"database_url": SecretStr(db)}), max_size=4)
    yield p
    await p.close()


def _registry(pool: asyncpg.Pool, keys: str) -> Registry:
    return Registry(pool, CredentialCipher(keys), producer="tests")


# --- what is stored --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stored:
    org: str
    mailboxes: dict[str, str]   # email: password (ann, bob)
    impersonated: str           # carl's mailbox signs in with the impersonation profile's password
    client_secret: str


async def _store_secrets(registry: Registry) -> Stored:
    """One of each kind of secret: mailbox credentials, profile credentials, an OAuth client secret."""
    org = await registry.add_organization(f"rotate-{uuid.uuid4().hex[:8]}")
    await registry.add_profile(org, ProfileInput(
        name="impersonating", server_type="imap", incoming_host="127.0.0.1", incoming_port=993,
        auth_method="profile_impersonation", profile_username="svc@example.com",
        profile_secret=SecretStr("impersonation-pw-1")))
    carl = await registry.add_user(org, "Carl", f"carl-{uuid.uuid4().hex[:6]}@example.com")   # on the default profile
    await registry.add_profile(org, ProfileInput(name="imap", server_type="imap", incoming_host="127.0.0.1",
                                                 incoming_port=993), make_default=True)
    await registry.add_profile(org, ProfileInput(
        name="o365", server_type="exchange_online", service_url="https://graph.microsoft.com/v1.0",
        auth_method="oauth2", oauth_token_url="https://login.example.com/token", oauth_client_id="app",
        oauth_client_secret=SecretStr("client-secret-1")))
    mailboxes = {}
    for name in ("ann", "bob"):
        user = await registry.add_user(org, name.title(), f"{name}-{uuid.uuid4().hex[:6]}@example.com")
        mailboxes[user.email] = f"{name}-password-1"
        await registry.set_credentials(org, user.email, None, SecretStr(mailboxes[user.email]))
    return Stored(org.name, mailboxes, carl.email, "client-secret-1")


async def _read_secrets(registry: Registry) -> dict[str, str]:
    """Every secret decrypted as the services decrypt it: a mailbox's sign-in (its own credentials or
    its profile's), and a profile's OAuth client secret from the profile row ingest and dispatch get."""
    async with registry.pool.acquire() as conn:
        rows = await conn.fetch("SELECT m.*, to_jsonb(p.*) AS profile FROM mailbox m "
                                "JOIN email_server_profile p ON p.id = m.profile_id ORDER BY m.email")
        profiles = await conn.fetch("SELECT name, to_jsonb(p.*) AS profile FROM email_server_profile p "
                                    "WHERE oauth_client_secret IS NOT NULL")
    found = {}
    for row in rows:
        work = MailboxWork(row, row["profile"], registry.cipher)
        if row["secret"] is not None or work.profile["auth_method"] == "profile_impersonation":
            found[row["email"]] = work.login()[1].get_secret_value()
    for row in profiles:
        token = decode_bytea(row["profile"]["oauth_client_secret"])
        found[f"profile {row['name']}"] = registry.cipher.decrypt(token).get_secret_value()
    return found


def _expected(stored: Stored) -> dict[str, str]:
    return {**stored.mailboxes, stored.impersonated: "impersonation-pw-1", "profile o365": stored.client_secret}


async def _ciphertexts(pool: asyncpg.Pool) -> list[tuple]:
    async with pool.acquire() as conn:
        return [tuple(r) for r in await conn.fetch(
            "SELECT 'mailbox', id, secret FROM mailbox WHERE secret IS NOT NULL "
            "UNION ALL SELECT 'profile', id, profile_secret FROM email_server_profile WHERE profile_secret IS NOT NULL "
            "UNION ALL SELECT 'oauth', id, oauth_client_secret FROM email_server_profile WHERE oauth_client_secret IS NOT NULL "
            "ORDER BY 1, 2")]


async def _conduit(db: str, tmp_path: Path, keys: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "DATABASE_URL": db, "CONDUIT_SECRET_KEY": keys, "CONDUIT_STATE_DIR": str(tmp_path / "state"),
           "CONDUIT_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "conduit", *args, env=env, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()


# --- the tests -------------------------------------------------------------------------------------

async def test_rotate_moves_every_secret_to_the_first_key(db: str, db_pool: asyncpg.Pool, tmp_path: Path) -> None:
    stored = await _store_secrets(_registry(db_pool, OLD))
    before = await _ciphertexts(db_pool)

    code, out, err = await _conduit(db, tmp_path, f"{NEW},{OLD}", "secrets", "rotate")
    assert code == 0, err
    assert out.strip() == ("rotated 4 secrets to the first key of CONDUIT_SECRET_KEY: 2 mailbox credentials, "
                           "1 profile credential, 1 OAuth client secret (4 had been under another key)")
    for secret in _expected(stored).values():
        assert secret not in out + err

    after = await _ciphertexts(db_pool)
    assert [r[:2] for r in after] == [r[:2] for r in before]
    assert all(a[2] != b[2] for a, b in zip(after, before))
    # NEW alone reads every secret; OLD alone none of them.
    assert await _read_secrets(_registry(db_pool, NEW)) == _expected(stored)
    old_alone = CredentialCipher(OLD)
    for _, _, token in after:
        with pytest.raises(InvalidInput, match="cannot be decrypted"):
            old_alone.decrypt(token)

    # Again, now with NEW alone: nothing is under another key, and nothing is lost.
    code, out, err = await _conduit(db, tmp_path, NEW, "secrets", "rotate", "--json")
    assert code == 0, err
    assert json.loads(out) == {"dry_run": False, "total": 4, "under_other_keys": 0, "rotated": {
        "mailbox_credentials": 2, "profile_credentials": 1, "oauth_client_secrets": 1}}
    assert await _read_secrets(_registry(db_pool, NEW)) == _expected(stored)


async def test_a_dry_run_changes_nothing(db: str, db_pool: asyncpg.Pool, tmp_path: Path) -> None:
    stored = await _store_secrets(_registry(db_pool, OLD))
    before = await _ciphertexts(db_pool)
    code, out, err = await _conduit(db, tmp_path, f"{NEW},{OLD}", "secrets", "rotate", "--dry-run")
    assert code == 0, err
    assert out.strip() == ("would rotate 4 secrets to the first key of CONDUIT_SECRET_KEY: 2 mailbox credentials, "
                           "1 profile credential, 1 OAuth client secret (4 under another key now); nothing changed")
    assert await _ciphertexts(db_pool) == before
    assert await _read_secrets(_registry(db_pool, OLD)) == _expected(stored)


async def test_nothing_stored_is_nothing_to_rotate(db: str, tmp_path: Path) -> None:
    code, out, err = await _conduit(db, tmp_path, f"{NEW},{OLD}", "secrets", "rotate")
    assert code == 0, err
    assert out.strip() == ("rotated 0 secrets to the first key of CONDUIT_SECRET_KEY: 0 mailbox credentials, "
                           "0 profile credentials, 0 OAuth client secrets (0 had been under another key)")


@pytest.mark.parametrize("stray", ["mailbox", "oauth"])
async def test_a_secret_no_key_decrypts_is_named_and_nothing_is_rotated(db: str, db_pool: asyncpg.Pool, tmp_path: Path,
                                                                       stray: str) -> None:
    stored = await _store_secrets(_registry(db_pool, OLD))
    # One more secret, stored under a key the rotation is not given.
    elsewhere = _registry(db_pool, STRAY)
    org = await elsewhere.organization(stored.org)
    if stray == "mailbox":
        dave = await elsewhere.add_user(org, "Dave", f"dave-{uuid.uuid4().hex[:6]}@example.com")
        await elsewhere.set_credentials(org, dave.email, None, SecretStr("dave-password-1"))
        named = f"the credentials of mailbox {dave.email} (organization {stored.org})"
        extra = {dave.email: "dave-password-1"}
    else:
        await elsewhere.add_profile(org, ProfileInput(
            name="graph-2", server_type="exchange_online", service_url="https://graph.microsoft.com/v1.0",
            auth_method="oauth2", oauth_token_url="https://login.example.com/token", oauth_client_id="app-2",
            oauth_client_secret=SecretStr("client-secret-2")))
        named = f"the OAuth client secret of profile graph-2 (organization {stored.org})"
        extra = {"profile graph-2": "client-secret-2"}
    before = await _ciphertexts(db_pool)

    for args in ((), ("--dry-run",)):
        code, out, err = await _conduit(db, tmp_path, f"{NEW},{OLD}", "secrets", "rotate", *args)
        assert code == 2, (out, err)
        assert "Traceback" not in err and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert named in lines[0] and "cannot be decrypted with any key of CONDUIT_SECRET_KEY" in lines[0]
        assert "nothing was rotated" in lines[0]
        assert "password-1" not in err and "client-secret" not in err
        assert await _ciphertexts(db_pool) == before

    # Every other secret is still under OLD: the stray one did not leave the rest half rotated.
    assert await _read_secrets(_registry(db_pool, f"{OLD},{STRAY}")) == {**_expected(stored), **extra}


async def test_rows_changed_later_in_the_transaction_are_rolled_back_too(db_pool: asyncpg.Pool) -> None:
    """A stray secret in the last column read: the columns rotated before it are not kept."""
    stored = await _store_secrets(_registry(db_pool, OLD))
    org = await _registry(db_pool, STRAY).organization(stored.org)
    await _registry(db_pool, STRAY).add_profile(org, ProfileInput(
        name="graph-3", server_type="exchange_online", service_url="https://graph.microsoft.com/v1.0",
        auth_method="oauth2", oauth_token_url="https://login.example.com/token", oauth_client_id="app-3",
        oauth_client_secret=SecretStr("client-secret-3")))
    before = await _ciphertexts(db_pool)
    async with db_pool.acquire() as conn:
        with pytest.raises(InvalidInput, match="profile graph-3"):
            await rotate_secrets(conn, CredentialCipher(f"{NEW},{OLD}"))
    assert await _ciphertexts(db_pool) == before
