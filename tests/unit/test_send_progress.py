"""`conduit send --wait`'s line for a status on the way: a failed attempt is said as one, and a
request waiting for its mailbox (inactive, backing off, not approved, ...) is not said to have
failed an attempt, even one made before its mailbox stopped sending."""
from __future__ import annotations

from conduit.cli.send_cmd import progress
from shared.events.payloads import EmailStatusV1


def _status(**fields) -> EmailStatusV1:
    return EmailStatusV1(idempotency_key="k1", status="pending_send", **fields)


def test_a_failed_attempt_is_said_with_the_servers_reply() -> None:
    line = progress(_status(reason="smtp_temporary", attempt=1, smtp_code=451, smtp_reply="4.3.0 try later"))
    assert line == "pending send, after attempt 1 failed (smtp_temporary): SMTP 451 4.3.0 try later"


def test_waiting_for_the_mailbox_is_no_failed_attempt() -> None:
    detail = "waiting: the mailbox eve@example.com is inactive; sent once it may send again"
    for attempt in (0, 1):
        line = progress(_status(reason="mailbox_inactive", attempt=attempt, detail=detail))
        assert line == f"pending send (mailbox_inactive): {detail}", line
