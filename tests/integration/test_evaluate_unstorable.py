"""An email.received event PostgreSQL could not store (a NUL in its Message-ID, from a producer other
than ingest, which strips it) is dead-lettered by evaluate, and the mail beside it is decided.  The
DataError used to count as a failure of the database, retried for ever: the partition stalled.  The
model now refuses the NUL as the event is read (``schema_error``); evaluate still dead-letters a
``DataError`` as ``unstorable`` for what the model lets through and PostgreSQL refuses."""
from __future__ import annotations

import uuid

from services.evaluate.service import EvaluateService
from shared.events.envelope import Envelope
from shared.events.payloads import EmailReceivedV1
from shared.events.topics import EMAIL_RECEIVED
from shared.lifecycle import run_service
from shared.rawstore import store_raw
from tests.integration.test_consumer_faults import dead_letters
from tests.support.mailboxes import message


async def dead_letter_reasons(settings) -> list[str]:
    return [dict(r.headers)["reason"].decode() for r in await dead_letters(settings, EMAIL_RECEIVED.name)]


async def test_an_unstorable_event_is_dead_lettered_and_the_mail_beside_it_is_decided(
        settings, registry, org, pool, publisher) -> None:
    email = f"u-{uuid.uuid4().hex[:8]}@example.com"
    await registry.add_user(org, "U", email)
    await registry.update_mailbox(org, email, email_approved=True, tracking="all")
    mailbox = await registry.mailbox(org, email)
    events = []
    for subject, message_id in (("bad", "a-nul-b@example.com"), ("good", "good@example.com")):
        raw = message(subject, to=email, message_id=f"<{message_id}>")
        async with pool.acquire() as conn:
            (sha,) = await store_raw(conn, [raw])
        events.append(Envelope[EmailReceivedV1](
            type=EMAIL_RECEIVED.name, schema_version=1, producer="another-system", organization_id=org.id,
            data=EmailReceivedV1(mailbox_id=mailbox.id, source="imap", uid=len(events) + 1, raw_sha256=sha,
                                 size=len(raw), message_id=message_id)))
    for event in events:   # the NUL written into the JSON, as another producer might
        value = event.model_dump_json().replace("a-nul-b@", "a\\u0000b@").encode()
        await publisher.publish_raw(EMAIL_RECEIVED.name, value, key=str(mailbox.id))
    await run_service(EvaluateService(settings), burst=True)
    assert await dead_letter_reasons(settings) == ["schema_error"]
    async with pool.acquire() as conn:
        decided = await conn.fetch("SELECT message_id FROM email_decision WHERE mailbox_id = $1", mailbox.id)
    assert [r["message_id"] for r in decided] == ["good@example.com"]
