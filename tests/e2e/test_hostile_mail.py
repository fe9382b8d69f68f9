"""Mail written to break a parser, end to end against Dovecot: a message whose From Python's address
parser cannot read (3,000 nested comments: RecursionError) reaching a forward mailbox.  It used to fail
its whole batch at every sync (``internal_error``, back-off), so no later mail of that mailbox was
ever ingested; now it is ingested as a message with no readable sender, and the mail after it too."""
from __future__ import annotations

import pytest

from shared.registry.service import Registry
from tests.e2e.test_inbound import activities, pipeline
from tests.support.mailboxes import imap_profile, message, ready_mailbox

pytestmark = pytest.mark.peers


async def test_a_sender_no_parser_can_read_does_not_stop_a_forward_mailbox(settings, registry: Registry, org,
                                                                         dovecot, pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, owner="forward")
    user = await registry.add_user(org, "Fran", "fran@example.com", incoming="forward_mailbox")
    await registry.update_mailbox(org, user.email, email_approved=True, tracking="all")
    hostile = (b"From: " + b"(" * 3000 + b"\r\nTo: " + box.email.encode() +
               b"\r\nSubject: hostile\r\nMessage-ID: <hostile@evil.example>\r\n\r\nhi\r\n")
    dovecot.deliver(box.email, hostile)
    dovecot.deliver(box.email, message("Fwd: legit", sender="Fran <fran@example.com>", to=box.email,
                                       message_id="<legit-1@example.com>"))
    await pipeline(settings)
    async with pool.acquire() as conn:
        ingested = await conn.fetchval("SELECT count(*) FROM ingested_message WHERE mailbox_id = $1", box.id)
        alerts = await conn.fetch("SELECT code, message FROM mailbox_alert WHERE mailbox_id = $1", box.id)
    assert ingested == 2, [tuple(a) for a in alerts]
    assert not [a for a in alerts if a["code"] == "internal_error"]
    assert "Fwd: legit" in await activities(pool, org)
