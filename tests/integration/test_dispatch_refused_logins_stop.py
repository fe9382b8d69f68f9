"""A profile's `stop_after_refused_logins` for outgoing email: dispatch sending through an SMTP server
(aiosmtpd) that refuses the mailbox's password stops signing in after that many refusals in a row.

The outgoing direction's Test & Enable result becomes a failure saying why, with an error alert; the
request that met the refusals waits as a request of a mailbox whose outgoing email is not enabled
does (`pending_send`, `outgoing_not_enabled`, until its deadline), new requests are refused so, and
the server sees no further connection.  Corrected credentials and Test & Enable make the mailbox
send again, the waiting request first.  The connections
are counted at a relay in front of the server: every one of them signs in.
"""
from __future__ import annotations

import asyncio
import uuid

import pytest
from pydantic import SecretStr

from conduit.peers.smtp import CaptureSmtpServer
from conduit.test_enable import test_enable as run_test_enable
from shared.kafka import Publisher
from shared.registry import service as registry_service
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.counting_relay import CountingRelay
from tests.support.dispatch import StatusReader, dispatch_running, outbound, publish, sending_mailbox
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers

# The mailbox's back-off while the test runs (30 s doubling to an hour otherwise), and how long the
# stopped mailbox is watched: back-off alone would have signed in again several times in it.
BACKOFF_BASE = 0.2
BACKOFF_CAP = 0.4
QUIET_WINDOW = 3.0


async def test_refused_sign_ins_stop_the_outgoing_direction_until_test_and_enable(
        settings: Settings, registry: Registry, org, publisher: Publisher, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(registry_service, "BACKOFF_BASE_SECONDS", BACKOFF_BASE)
    monkeypatch.setattr(registry_service, "BACKOFF_CAP_SECONDS", BACKOFF_CAP)
    email = f"bob-{uuid.uuid4().hex[:6]}@example.com"
    with CaptureSmtpServer(tmp_path / "auth", users={email: "right"}, require_auth=True) as server:
        async with CountingRelay(server.host, server.port) as relay:
            sender = await sending_mailbox(registry, org, host="127.0.0.1", port=relay.port, password="wrong")
            await registry.set_credentials(org, sender.email, email, SecretStr("wrong"))
            await registry.update_profile(org, sender.profile, stop_after_refused_logins=2)
            first = outbound(org, mailbox_id=sender.mailbox_id)
            async with dispatch_running(settings, retry_base_seconds=0.05, poll_seconds=0.05,
                                        unavailable_recheck_seconds=0.5), \
                    StatusReader(settings) as reader:
                await publish(publisher, first)
                stopped = await eventually(lambda: _stopped(registry, org, sender.email), timeout=30,
                                           what="the outgoing direction stopped")
                assert stopped.outgoing.status == "failure"
                assert (stopped.outgoing.refused_logins, stopped.outgoing.error_count) == (2, 2)
                alert = stopped.alerts[0]
                assert (alert.severity, alert.direction, alert.code) == ("error", "outgoing", "stopped_refused_logins")
                assert f"conduit mailbox set-credentials {sender.email}" in alert.message
                assert f"conduit mailbox test-enable {sender.email} --direction outgoing" in alert.message
                assert "wrong" not in alert.message   # the password is never in it

                # The request that met the refusals waits as one of a mailbox not enabled for outgoing email.
                async def waiting():
                    await reader.poll()
                    return [s for s in reader.by_key.get(first.data.idempotency_key, [])
                            if (s.status, s.reason) == ("pending_send", "outgoing_not_enabled")]
                await eventually(waiting, timeout=30, what="the first request waiting for the mailbox")
                assert relay.sessions == 2
                await asyncio.sleep(QUIET_WINDOW)   # the observation window itself: nothing may happen in it
                assert relay.sessions == 2

                # A new request is refused at once, without a connection.
                second = outbound(org, mailbox_id=sender.mailbox_id)
                await publish(publisher, second)
                final = await _final(reader, second.data.idempotency_key)
                assert (final.status, final.reason) == ("rejected", "outgoing_not_enabled")
                assert relay.sessions == 2

                # Corrected credentials and Test & Enable: the mailbox sends again, the waiting request too.
                await registry.set_credentials(org, sender.email, email, SecretStr("right"))
                assert (await registry.mailbox(org, sender.email)).outgoing.stopped
                results = await run_test_enable(registry, org, sender.email, ["outgoing"])
                assert results["outgoing"][0] is True, results
                third = outbound(org, mailbox_id=sender.mailbox_id)
                await publish(publisher, third)
                assert (await _final(reader, third.data.idempotency_key)).status == "sent"
                assert (await _final(reader, first.data.idempotency_key)).status == "sent"
        assert len(server.messages()) == 2
    mailbox = await registry.mailbox(org, sender.email)
    assert mailbox.outgoing.status == "success" and not mailbox.outgoing.stopped
    assert (mailbox.outgoing.error_count, mailbox.outgoing.refused_logins) == (0, 0)


async def _stopped(registry: Registry, org, email: str):
    mailbox = await registry.mailbox(org, email)
    return mailbox if mailbox.outgoing.stopped else None


async def _final(reader: StatusReader, key: str):
    """The request's final status on `email.status`, once there is one."""
    async def final():
        await reader.poll()
        return reader.final(key)
    return await eventually(final, timeout=30, what=f"a final status of {key}")
