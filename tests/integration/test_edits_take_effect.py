"""An administrator's fix takes effect at the next registry refresh, not when the back-off ends.

A mailbox whose password or port is wrong backs off (30 s at the first failure, doubling up to an
hour).  Correcting the credentials (`conduit mailbox set-credentials`) or the profile's server
(`conduit profile set`) ends that back-off: ingest (real Dovecot) and dispatch (aiosmtpd with AUTH)
start sessions with the new settings within seconds, and the command says so.  Each test checks that
the back-off had far longer to run when the fix was made than the test then waits."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
from pydantic import SecretStr

from conduit.peers.ports import free_port
from conduit.peers.smtp import CaptureSmtpServer
from shared.kafka import Publisher
from shared.registry.models import Organization
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.cli import conduit_cli
from tests.support.dispatch import dispatch_running, outbound, publish, sending_mailbox
from tests.support.inbound import ingest_running
from tests.support.mailboxes import imap_profile, message, ready_mailbox
from tests.support.waiting import eventually

# How long a fixed mailbox may take to work again: the services' refresh (1 s for ingest here, 2 s
# for dispatch) and a session, far less than what is left of the first back-off (30 s) at the fix.
TAKES_EFFECT_WITHIN = 12.0
BACKOFF_LEFT_AT_LEAST = timedelta(seconds=20)


async def _cli(settings: Settings, *args: str) -> str:
    rc, out, err = await conduit_cli(settings, *args)
    assert rc == 0, f"conduit {' '.join(args)} failed ({rc}): {out}{err}"
    return out


async def _backing_off(registry: Registry, org: Organization, email: str, direction: str) -> datetime:
    """Wait until the direction fails and backs off; its back-off's end, checked to be far enough away
    that the work after the fix cannot be the back-off running out."""
    async def waiting() -> datetime | None:
        state = getattr(await registry.mailbox(org, email), direction)
        return state.backoff_until if state.error_count and state.backoff_until else None
    until = await eventually(waiting, timeout=30, what=f"{direction} backing off")
    assert until - datetime.now(timezone.utc) > BACKOFF_LEFT_AT_LEAST, f"back-off too short to tell: {until}"
    return until


async def _request_waits(pool: asyncpg.Pool, key: str) -> bool:
    """The request is back in the ledger after the failed attempt, postponed for the back-off (the
    administrator fixes what dispatch has already recorded)."""
    async with pool.acquire() as conn:
        return await conn.fetchval(
            "SELECT status = 'pending_send' AND next_attempt_at > now() + $2::interval FROM outbound_email "
            "WHERE idempotency_key = $1", key, BACKOFF_LEFT_AT_LEAST)


async def _ingested(pool: asyncpg.Pool, mailbox_id: uuid.UUID) -> int:
    async with pool.acquire() as conn:
        return await conn.fetchval("SELECT count(*) FROM ingested_message WHERE mailbox_id = $1", mailbox_id)


async def _recovered(registry: Registry, org: Organization, email: str, direction: str) -> None:
    mailbox = await registry.mailbox(org, email)
    state = getattr(mailbox, direction)
    assert state.error_count == 0 and state.backoff_until is None and state.status == "success"
    assert any(a.code == "recovered" and a.direction == direction for a in mailbox.alerts)


async def test_ingest_wrong_password_fixed_with_the_cli_is_used_at_once(
        settings: Settings, registry: Registry, org: Organization, dovecot, pool: asyncpg.Pool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await registry.add_profile(org, imap_profile(dovecot, name=f"p-{uuid.uuid4().hex[:6]}"), make_default=True)
    box = await ready_mailbox(registry, org, dovecot)
    await registry.set_credentials(org, box.email, box.email, SecretStr("wrong"))
    dovecot.deliver(box.email, message("waiting for the right password", to=box.email))
    async with ingest_running(settings, refresh_seconds=1.0):
        await _backing_off(registry, org, box.email, "incoming")
        assert await _ingested(pool, box.id) == 0
        monkeypatch.setenv("CONDUIT_MAILBOX_SECRET", box.password)
        out = await _cli(settings, "mailbox", "set-credentials", box.email, "--org", org.name)
        await eventually(lambda: _ingested(pool, box.id), timeout=TAKES_EFFECT_WITHIN, what="the mail read")
        assert f"{box.email}: back-off cleared (incoming): the next sessions use the new credentials" in out
        await eventually(lambda: _recovery_recorded(registry, org, box.email, "incoming"), timeout=TAKES_EFFECT_WITHIN,
                         what="the recovery recorded")
    await _recovered(registry, org, box.email, "incoming")


async def test_ingest_wrong_port_fixed_with_the_cli_is_used_at_once(
        settings: Settings, registry: Registry, org: Organization, dovecot, pool: asyncpg.Pool) -> None:
    profile = f"p-{uuid.uuid4().hex[:6]}"
    await registry.add_profile(org, imap_profile(dovecot, name=profile, incoming_port=free_port()), make_default=True)
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver(box.email, message("waiting for the right port", to=box.email))
    async with ingest_running(settings, refresh_seconds=1.0):
        await _backing_off(registry, org, box.email, "incoming")
        out = await _cli(settings, "profile", "set", profile, "--incoming-port", str(dovecot.imap_port), "--org", org.name)
        await eventually(lambda: _ingested(pool, box.id), timeout=TAKES_EFFECT_WITHIN, what="the mail read")
        assert f"profile {profile}: back-off cleared for 1 mailbox (incoming): their next sessions use the new settings" \
            in out
        await eventually(lambda: _recovery_recorded(registry, org, box.email, "incoming"), timeout=TAKES_EFFECT_WITHIN,
                         what="the recovery recorded")
    await _recovered(registry, org, box.email, "incoming")


async def test_dispatch_wrong_password_fixed_is_used_at_once(
        settings: Settings, registry: Registry, org: Organization, publisher: Publisher, pool: asyncpg.Pool, tmp_path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    login, password = f"bob-{uuid.uuid4().hex[:6]}@example.com", f"right-{uuid.uuid4().hex[:6]}"
    with CaptureSmtpServer(tmp_path / "auth", users={login: password}, require_auth=True) as server:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=server.port, password="wrong")
        await registry.set_credentials(org, sender.email, login, SecretStr("wrong"))
        async with dispatch_running(settings):
            request = outbound(org, sender_email=sender.email, subject="after the fix")
            await publish(publisher, request)
            await _backing_off(registry, org, sender.email, "outgoing")
            await eventually(lambda: _request_waits(pool, request.data.idempotency_key), what="the request postponed")
            assert not server.messages()
            monkeypatch.setenv("CONDUIT_MAILBOX_SECRET", password)
            out = await _cli(settings, "mailbox", "set-credentials", sender.email, "--username", login, "--org", org.name)
            await eventually(lambda: _sent(server), timeout=TAKES_EFFECT_WITHIN, what="the message sent")
            assert f"{sender.email}: back-off cleared (outgoing): the next sessions use the new credentials" in out
        await _recovered(registry, org, sender.email, "outgoing")


async def test_dispatch_wrong_port_fixed_through_the_registry_is_used_at_once(
        settings: Settings, registry: Registry, org: Organization, publisher: Publisher, pool: asyncpg.Pool,
        tmp_path) -> None:
    with CaptureSmtpServer(tmp_path / "port") as server:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=free_port())
        async with dispatch_running(settings):
            request = outbound(org, sender_email=sender.email, subject="after the fix")
            await publish(publisher, request)
            await _backing_off(registry, org, sender.email, "outgoing")
            await eventually(lambda: _request_waits(pool, request.data.idempotency_key), what="the request postponed")
            await registry.update_profile(org, sender.profile, outgoing_port=server.port)
            await eventually(lambda: _sent(server), timeout=TAKES_EFFECT_WITHIN, what="the message sent")
        await _recovered(registry, org, sender.email, "outgoing")


async def test_an_edit_that_changes_no_server_keeps_the_back_off_and_a_stop_stays(
        settings: Settings, registry: Registry, org: Organization, dovecot, pool: asyncpg.Pool) -> None:
    """Only a new server or sign-in ends a back-off; and a direction stopped after refused sign-ins
    stays stopped whatever is edited, until Test & Enable."""
    profile = f"p-{uuid.uuid4().hex[:6]}"
    await registry.add_profile(org, imap_profile(dovecot, name=profile), make_default=True)
    box = await ready_mailbox(registry, org, dovecot)
    until = await registry.record_failure(box.id, "incoming", "connection_failed", "connection refused")
    out = await _cli(settings, "profile", "set", profile, "--polling-interval", "7", "--max-connections", "3",
                     "--org", org.name)
    assert "back-off cleared" not in out
    assert (await registry.mailbox(org, box.email)).incoming.backoff_until == until
    async with pool.acquire() as conn:
        await conn.execute("UPDATE mailbox SET outgoing_status = 'success' WHERE id = $1", box.id)
        await conn.execute("UPDATE email_server_profile SET stop_after_refused_logins = 1 WHERE name = $1", profile)
    await registry.record_failure(box.id, "outgoing", "authentication_failed", "the SMTP server refused the credentials")
    stopped = await registry.mailbox(org, box.email)
    assert stopped.outgoing.stopped and stopped.outgoing.status == "failure"
    await registry.set_credentials(org, box.email, box.email, SecretStr(box.password))
    after = await registry.mailbox(org, box.email)
    assert after.incoming.backoff_until is None and after.incoming.error_count == 1   # the recovery is still told
    assert after.outgoing.stopped and after.outgoing.status == "failure" and after.outgoing.refused_logins == 0


async def test_moving_received_after_says_what_it_does_not_bring_back(
        settings: Settings, registry: Registry, org: Organization, dovecot) -> None:
    profile = f"p-{uuid.uuid4().hex[:6]}"
    later = datetime.now(timezone.utc) + timedelta(days=1)
    await registry.add_profile(org, imap_profile(dovecot, name=profile, process_email_received_after=later))
    out = await _cli(settings, "profile", "set", profile, "--clear", "received-after", "--org", org.name)
    assert (f"profile {profile}: no received-after date applies to mail received from now on; mail skipped before "
            "is not fetched again") in out
    out = await _cli(settings, "profile", "set", profile, "--received-after", "2026-01-02T03:04:00+00:00",
                     "--org", org.name)
    assert "email received after 2026-01-02" in out and "mail skipped before is not fetched again" in out
    out = await _cli(settings, "profile", "set", profile, "--polling-interval", "9", "--org", org.name)
    assert "received" not in out


async def _recovery_recorded(registry: Registry, org: Organization, email: str, direction: str) -> bool:
    return getattr(await registry.mailbox(org, email), direction).error_count == 0


async def _sent(server: CaptureSmtpServer) -> bool:
    return bool(server.messages())
