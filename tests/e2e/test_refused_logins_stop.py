"""A profile's `stop_after_refused_logins`: a mailbox whose sign-ins Dovecot refuses that many times
in a row stops signing in (its incoming Test & Enable result becomes a failure saying why), instead
of retrying with back-off until an account-lockout policy locks the account; it is processed again
once its credentials are corrected and Test & Enable succeeds.

Ingest runs for real, as a long-lived service; the sign-ins are counted where the server counts them,
in Dovecot's log (``auth_verbose``: one "Password mismatch" line per refused password, one "Login"
line per accepted one).  Back-off is shortened to fractions of a second, so that a stopped mailbox
would have been retried several times within the window in which the tests watch it stay quiet.

The default (no limit: back off, retry, recover by itself) is covered by
``tests/integration/test_ingest.py::test_wrong_password_alerts_backs_off_and_recovers``; here, a
limit turned off again (0) behaves so too.
"""
from __future__ import annotations

import asyncio
import re

import pytest
from pydantic import SecretStr

from conduit.peers.ports import free_port
from conduit.test_enable import test_enable as run_test_enable
from shared.registry import service as registry_service
from shared.registry.service import Registry
from tests.support.inbound import ingest_running
from tests.support.mailboxes import imap_profile, message, ready_mailbox
from tests.support.topics import read_topic
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers

# Back-off while these tests run: 0.2 s, then 0.4 s at most (30 s doubling to an hour otherwise).
BACKOFF_BASE = 0.2
BACKOFF_CAP = 0.4
# How long a stopped mailbox is watched: with the back-off above and ingest's 0.5 s refresh, a
# mailbox that was only backing off would have been signed in to four times or more.
QUIET_WINDOW = 3.0


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_service, "BACKOFF_BASE_SECONDS", BACKOFF_BASE)
    monkeypatch.setattr(registry_service, "BACKOFF_CAP_SECONDS", BACKOFF_CAP)


def sign_ins(dovecot, address: str) -> tuple[int, int]:
    """(refused, accepted) sign-ins of ``address`` in Dovecot's log so far."""
    text = dovecot.log_path.read_text(errors="replace")
    refused = len(re.findall(rf"passwd-file\({re.escape(address.lower())},[^)]*\): Password mismatch", text))
    accepted = len(re.findall(rf"Login: user=<{re.escape(address.lower())}>", text))
    return refused, accepted


async def mailbox_events(settings, mailbox_id) -> list[dict]:
    """This test's `mailbox.events` about one mailbox, as ingest's outbox relay published them."""
    return [e["data"] for e in await read_topic(settings, "mailbox.events", 0, timeout=2.0)
            if e["data"]["mailbox_id"] == str(mailbox_id)]


async def test_refused_sign_ins_stop_the_incoming_direction_until_test_and_enable(
        settings, registry: Registry, org, dovecot) -> None:
    await registry.add_profile(org, imap_profile(dovecot, stop_after_refused_logins=2))
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver(box.email, message("waiting for the right password"))
    dovecot.set_password(box.email, "changed-on-the-server")

    async with ingest_running(settings) as ingest:
        stopped = await eventually(lambda: _stopped(registry, org, box.email), timeout=30,
                                   what="the incoming direction stopped")
        assert stopped.incoming.status == "failure"
        assert (stopped.incoming.refused_logins, stopped.incoming.error_count) == (2, 2)
        alert = stopped.alerts[0]
        assert (alert.severity, alert.direction, alert.code) == ("error", "incoming", "stopped_refused_logins")
        assert stopped.incoming.test_message == alert.message
        assert "stopped after 2 refused sign-ins in a row" in alert.message
        assert f"conduit mailbox set-credentials {box.email}" in alert.message
        assert f"conduit mailbox test-enable {box.email} --direction incoming" in alert.message
        assert "changed-on-the-server" not in alert.message and box.password not in alert.message
        # Dovecot refused exactly two sign-ins, and sees none after the stop, where back-off alone
        # would have tried again every half second.
        await eventually(lambda: _async(sign_ins(dovecot, box.email) == (2, 0)), what="two refused sign-ins at Dovecot")
        await eventually(lambda: _async(box.id not in ingest.runners), what="the mailbox's runner ended")
        await asyncio.sleep(QUIET_WINDOW)   # the observation window itself: nothing may happen in it
        assert sign_ins(dovecot, box.email) == (2, 0)
        assert box.id not in ingest.runners
        assert (await registry.mailbox(org, box.email)).incoming.refused_logins == 2

        # mailbox.events: the direction reads as a failed Test & Enable, then the error alert.
        events = await eventually(lambda: _stop_events(settings, box.id), what="the stop on mailbox.events")
        assert [(e["kind"], e["severity"]) for e in events] == [("tested", "error"), ("alert", "error")]
        assert not [e for e in await mailbox_events(settings, box.id)
                    if e["kind"] == "backoff" and e["code"] == "stopped_refused_logins"]

        # Corrected credentials alone do not start it again: Test & Enable does.
        await registry.set_credentials(org, box.email, box.email, SecretStr("changed-on-the-server"))
        mailbox = await registry.mailbox(org, box.email)
        assert mailbox.incoming.stopped and mailbox.incoming.status == "failure" and mailbox.incoming.refused_logins == 0
        results = await run_test_enable(registry, org, box.email, ["incoming"])
        assert results["incoming"][0] is True, results
        recovered = await eventually(lambda: _ingested(registry, org, box.email, 1), timeout=30,
                                     what="the waiting message ingested")
        assert recovered.incoming.status == "success" and not recovered.incoming.stopped
        assert (recovered.incoming.error_count, recovered.incoming.refused_logins) == (0, 0)
    refused, accepted = sign_ins(dovecot, box.email)
    assert refused == 2 and accepted >= 2   # Test & Enable's, then ingest's


async def test_a_limit_turned_off_again_keeps_retrying_a_wrong_password_and_recovers_by_itself(
        settings, registry: Registry, org, dovecot) -> None:
    await registry.add_profile(org, imap_profile(dovecot, stop_after_refused_logins=2))
    profile = await registry.update_profile(org, "dovecot-imap", stop_after_refused_logins=0)
    assert profile.stop_after_refused_logins is None
    box = await ready_mailbox(registry, org, dovecot)
    dovecot.deliver(box.email, message("waiting"))
    dovecot.set_password(box.email, "changed-on-the-server")

    async with ingest_running(settings):
        # Past the limit it once had, and still retried: back-off only, as by default.
        mailbox = await eventually(lambda: _refused_at_least(registry, org, box.email, 4), timeout=30,
                                   what="four refused sign-ins recorded")
        assert mailbox.incoming.status == "success" and not mailbox.incoming.stopped
        assert sign_ins(dovecot, box.email)[0] >= 4
        assert {a.code for a in mailbox.alerts} == {"authentication_failed"}
        # The server takes the mailbox's password again: it recovers with no one running Test & Enable.
        dovecot.set_password(box.email, box.password)
        recovered = await eventually(lambda: _ingested(registry, org, box.email, 1), timeout=30,
                                     what="the waiting message ingested")
        assert (recovered.incoming.error_count, recovered.incoming.refused_logins) == (0, 0)
        assert recovered.alerts[0].code == "recovered"


async def test_a_refused_connection_never_stops_the_mailbox(settings, registry: Registry, org, dovecot) -> None:
    """Only the server refusing the credentials counts: nothing listening (a server down) is
    retried with back-off however often it happens, even with the limit at 1."""
    await registry.add_profile(org, imap_profile(dovecot, incoming_port=free_port(), stop_after_refused_logins=1))
    box = await ready_mailbox(registry, org, dovecot)

    async with ingest_running(settings):
        failing = await eventually(lambda: _failed_at_least(registry, org, box.email, 3), timeout=30,
                                   what="three connection failures")
    assert failing.incoming.status == "success" and not failing.incoming.stopped
    assert failing.incoming.refused_logins == 0
    assert {a.code for a in failing.alerts} == {"connection_failed"}


async def _stopped(registry: Registry, org, email: str):
    mailbox = await registry.mailbox(org, email)
    return mailbox if mailbox.incoming.stopped else None


async def _ingested(registry: Registry, org, email: str, count: int):
    mailbox = await registry.mailbox(org, email, sync=True)
    return mailbox if mailbox.sync is not None and mailbox.sync.ingested >= count else None


async def _refused_at_least(registry: Registry, org, email: str, count: int):
    mailbox = await registry.mailbox(org, email)
    return mailbox if mailbox.incoming.refused_logins >= count else None


async def _failed_at_least(registry: Registry, org, email: str, count: int):
    mailbox = await registry.mailbox(org, email)
    return mailbox if mailbox.incoming.error_count >= count else None


async def _stop_events(settings, mailbox_id) -> list[dict]:
    events = [e for e in await mailbox_events(settings, mailbox_id) if e["code"] == "stopped_refused_logins"]
    return events if len(events) >= 2 else []


async def _async(value):
    return value
