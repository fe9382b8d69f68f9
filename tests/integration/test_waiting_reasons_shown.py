"""What an administrator is told about a request that waits, and about a service of `conduit up`
killed by a signal (found by an audit, helper-83).

- A request accepted while its mailbox backs off waits as `mailbox_backoff`: its ledger row says so
  from the start, so `conduit outbound show` does too (it used to be only in the status event).
- A request waiting for its mailbox (inactive, its owner's outgoing method none, ...) is explained as
  waiting for its mailbox, with the command that mends it, not as "the last attempt failed" after
  0 attempts.
- A service of `conduit up` killed by a signal is said to be, not "its own error is above" with
  nothing above.

Against PostgreSQL, the broker, a running dispatch, an SMTP capture server and the `conduit` command
(a subprocess); the last one against a `conduit up` of its own.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest

from conduit.peers.smtp import CaptureSmtpServer
from services.dispatch import ledger
from shared.db.pool import database_url
from shared.registry import models
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.cli import conduit_cli
from tests.support.databases import scratch_database
from tests.support.dispatch import Sender, dispatch_running, finals, outbound, publish, sending_mailbox
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = dict(mailbox_refresh_seconds=0.2, unavailable_recheck_seconds=0.5, poll_seconds=0.05)


async def _row(pool: asyncpg.Pool, org_id: uuid.UUID, key: str) -> asyncpg.Record | None:
    async with pool.acquire() as conn:
        return await conn.fetchrow("SELECT status, reason, detail, attempts FROM outbound_email "
                                   "WHERE organization_id = $1 AND idempotency_key = $2", org_id, key)


async def _back_off(pool: asyncpg.Pool, sender: Sender) -> None:
    async with pool.acquire() as conn:
        await conn.execute("UPDATE mailbox SET outgoing_backoff_until = now() + interval '1 hour' WHERE id = $1",
                           sender.mailbox_id)


async def _send(settings: Settings, org: models.Organization, sender: Sender, key: str) -> None:
    code, out, err = await conduit_cli(settings, "send", "--org", org.name, "--from", sender.email, "--to",
                                       "bea@customer.example", "--subject", "Waits", "--text", "hi", "--key", key)
    assert code == 0, (out, err)


async def _show(settings: Settings, org: models.Organization, key: str) -> tuple[str, dict]:
    code, out, err = await conduit_cli(settings, "outbound", "show", key, "--org", org.name)
    assert code == 0, err
    code, js, err = await conduit_cli(settings, "outbound", "show", key, "--org", org.name, "--json")
    assert code == 0, err
    return out, json.loads(js)


# --- L1: a request accepted behind a back-off says so in the ledger ---------------------------------

async def test_outbound_show_says_a_request_waits_for_its_mailboxs_backoff(
        settings: Settings, registry: Registry, org, pool: asyncpg.Pool, tmp_path) -> None:
    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        await _back_off(pool, sender)
        key = f"w1-{uuid.uuid4().hex[:8]}"
        async with dispatch_running(settings, **OPTIONS):
            await _send(settings, org, sender, key)
            async def accepted() -> bool:
                return await _row(pool, org.id, key) is not None
            await eventually(accepted, what="the request in the send ledger")
            row = await _row(pool, org.id, key)
            out, shown = await _show(settings, org, key)
        assert not capture.messages()
    assert (row["status"], row["reason"]) == ("pending_send", "mailbox_backoff"), dict(row)
    assert row["detail"] == "the mailbox is backing off after failures; sending when it ends"
    assert (shown["status"], shown["reason"]) == ("pending_send", "mailbox_backoff"), shown
    lines = out.splitlines()
    assert any(line.split() == ["reason", "mailbox_backoff"] for line in lines), out
    explanation = lines[-1]
    assert explanation.startswith("Waiting to be sent at ") and "after 0 attempt(s)" in explanation, explanation
    assert "waiting for its mailbox (mailbox_backoff): the mailbox is backing off after failures" in explanation
    assert f"`conduit mailbox show {sender.email}` says why it backs off" in explanation
    assert "last attempt failed" not in explanation


# --- L2: waiting for its mailbox, not "the last attempt failed" --------------------------------------

@pytest.mark.parametrize("edit, reason, cause, mend", [
    ("deactivate", "mailbox_inactive", "the mailbox {email} is inactive", "`conduit mailbox activate {email}`"),
    ("outgoing none", "outgoing_not_enabled",
     "the owner's outgoing email is not delivered by server-side synchronization",
     "`conduit user set {email} --outgoing server_side_sync`"),
])
async def test_a_request_waiting_for_its_mailbox_is_explained_with_what_mends_it(
        settings: Settings, registry: Registry, org, pool: asyncpg.Pool, tmp_path, edit, reason, cause, mend) -> None:
    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        await _back_off(pool, sender)   # accepted, then waiting: dispatch refuses a request for a mailbox that may not send
        key = f"w2-{uuid.uuid4().hex[:8]}"
        async with dispatch_running(settings, **OPTIONS):
            await _send(settings, org, sender, key)
            async def accepted() -> bool:
                return await _row(pool, org.id, key) is not None
            await eventually(accepted, what="the request in the send ledger")
            if edit == "deactivate":
                await registry.update_mailbox(org, sender.email, active=False)
            else:
                await registry.update_user(org, sender.email, outgoing_method="none")
            async with pool.acquire() as conn:   # the back-off ends; the mailbox still may not send
                await conn.execute("UPDATE mailbox SET outgoing_backoff_until = NULL WHERE id = $1", sender.mailbox_id)
                await conn.execute("UPDATE outbound_email SET next_attempt_at = now() WHERE organization_id = $1 "
                                   "AND idempotency_key = $2", org.id, key)
            async def waiting() -> bool:
                row = await _row(pool, org.id, key)
                return row is not None and row["reason"] == reason
            await eventually(waiting, timeout=15, what=f"the request waiting for its mailbox ({reason})")
            out, shown = await _show(settings, org, key)
        assert not capture.messages()
    for explanation in (out.splitlines()[-1], shown["explanation"]):   # its time to look again moves on between them
        assert explanation.startswith("Waiting to be sent, after 0 attempt(s); waiting for its mailbox "
                                      f"({reason}): {cause.format(email=sender.email)}; sent once it may send again"), \
            explanation
        assert f"). Mended by {mend.format(email=sender.email)}" in explanation, explanation
        assert "last attempt failed" not in explanation and "waiting: " not in explanation


def test_dispatch_and_the_registry_agree_on_the_reasons_that_wait_for_a_mailbox() -> None:
    """`conduit outbound show` explains as waiting exactly the reasons dispatch waits with."""
    assert set(models.WAITING_FOR_MAILBOX) == ledger.WAITING_FOR_MAILBOX


# --- L9: a service of `conduit up` killed by a signal -----------------------------------------------

@pytest.fixture(scope="module")
async def db_url(base_settings: Settings) -> AsyncIterator[str]:
    """A fresh database on the session's PostgreSQL: the stack here runs ingest over every mailbox."""
    async with scratch_database(database_url(base_settings), "waiting", migrated=True) as url:
        yield url


@pytest.fixture
def up_env(db_url: str) -> AsyncIterator[dict[str, str]]:
    # Not tmp_path: the embedded PostgreSQL and Dovecot run as other users and must reach it.
    path = Path(tempfile.mkdtemp(prefix="conduit-waiting-"))
    path.chmod(0o755)
    env = {**os.environ, "DATABASE_URL": db_url, "CONDUIT_STATE_DIR": str(path / "conduit"),
           "CONDUIT_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT), "CONDUIT_STOP_GRACE_SECONDS": "10"}
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "CONDUIT_TOPIC_PREFIX", "CALF_TANSU_BIN"):
        env.pop(name, None)
    yield env
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _children(pid: int) -> dict[str, int]:
    """`conduit up`'s services by name, read from /proc."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            argv = Path(f"/proc/{child}/cmdline").read_bytes().decode().split("\0")
            if "run" in argv:
                found[argv[argv.index("run") + 1]] = int(child)
    return found


async def test_up_says_a_service_killed_by_a_signal_was_not_an_error_of_its_own(up_env) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conduit", "up", env=up_env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    out: list[str] = []
    err: list[str] = []

    async def read(stream: asyncio.StreamReader, into: list[str]) -> None:
        async for line in stream:
            into.append(line.decode().rstrip("\n"))
    readers = [asyncio.create_task(read(proc.stdout, out)), asyncio.create_task(read(proc.stderr, err))]

    async def said(text: str) -> bool:
        if any(text in line for line in out):
            return True
        assert proc.returncode is None, f"conduit up exited ({proc.returncode}): {out} {err}"
        return False
    try:
        await eventually(lambda: said("conduit is up"), timeout=90, what="conduit up started")
        os.kill(_children(proc.pid)["dispatch"], signal.SIGKILL)
        await eventually(lambda: said("dispatch   started again"), timeout=60, what="dispatch started again")
        ended = [line for line in out if line.startswith("dispatch") and "exited on its own" in line]
        assert ended == ["dispatch   exited on its own (code -9): killed by signal 9 (SIGKILL); starting it again in 1 s"], out
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0, err
    finally:
        if proc.returncode is None:   # it failed: kill what it started (the broker has a session of its own)
            record = Path(up_env["CONDUIT_STATE_DIR"]) / "stack.json"
            pids = json.loads(record.read_text()).get("broker_pid") if record.exists() else None
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            for pid in [pids] if pids else []:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        await asyncio.gather(*readers, return_exceptions=True)


@pytest.mark.parametrize("code, said", [(-9, "killed by signal 9 (SIGKILL)"), (-15, "killed by signal 15 (SIGTERM)"),
                                        (-99, "killed by signal 99")])
def test_a_signal_is_named(code, said) -> None:
    from conduit.stack import killed_by

    assert killed_by(code) == said


async def test_a_request_that_waited_for_a_backoff_past_its_deadline_fails_saying_it_waited_not_erred(
        settings: Settings, registry: Registry, org, pool: asyncpg.Pool, publisher, tmp_path) -> None:
    """Its ledger row said `mailbox_backoff` from the start: the failure names the wait, not a "last error"."""
    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        async with dispatch_running(settings, **OPTIONS):
            async with pool.acquire() as conn:
                await conn.execute("UPDATE mailbox SET outgoing_backoff_until = now() + interval '20 seconds' "
                                   "WHERE id = $1", sender.mailbox_id)
            # Time enough to be found waiting first, on a loaded machine too (3 s was not, in a CI check).
            event = outbound(org, mailbox_id=sender.mailbox_id, deadline=datetime.now(timezone.utc) + timedelta(seconds=12))
            key = event.data.idempotency_key
            await publish(publisher, event)
            async def accepted() -> bool:
                return await _row(pool, org.id, key) is not None
            await eventually(accepted, what="the request in the send ledger")
            assert (await _row(pool, org.id, key))["reason"] == "mailbox_backoff"   # accepted behind the back-off
            final = (await finals(settings, [key], timeout=45)).final(key)
        assert not capture.messages()
    assert (final.status, final.reason) == ("failed", "deadline_exceeded"), final
    assert final.detail == ("the deadline passed before it could be sent (after 0 attempt(s)); it waited for its "
                            "mailbox (mailbox_backoff): the mailbox is backing off after failures"), final.detail
