"""Header injection through RFC 2047 encoded words, end to end: events on the broker, DispatchService in
burst mode, an aiosmtpd capture server.  Requests carrying an encoded word that decodes to CR/LF are
rejected (``header_injection``) and dead-lettered; a mailbox whose name carries one fails its sends;
nothing injected reaches the server; message ids and URLs go out verbatim."""
from __future__ import annotations

import base64
import json
import uuid

import pytest
from aiokafka import AIOKafkaConsumer

from conduit.peers.smtp import CaptureSmtpServer
from shared.errors import InvalidInput
from shared.events.envelope import encode_event
from shared.kafka import client_options, topic_name
from tests.support.dispatch import dispatch, finals, outbound, publish, publish_raw, sending_mailbox

INJECTION = "=?utf-8?q?x=0D=0AX-Injected:_yes=0D=0ABcc:_attacker@evil.example?="
OUTLOOK_ID = "<AM9PR02MB7654A1B2C3D4E5F6A7B8C9D0E1F2A3B4C5D6@AM9PR02MB7654.eurprd02.prod.outlook.com>"
UNSUBSCRIBE = "<https://example.com/unsubscribe?list=news&token=" + "a1b2c3d4" * 12 + ">"


@pytest.fixture
def capture(tmp_path):
    with CaptureSmtpServer(tmp_path / "capture") as server:
        yield server




async def _dead_letter_reasons(settings, keys: set[str]) -> dict[str, str]:
    consumer = AIOKafkaConsumer(topic_name(settings, "email.outbound.dlq"), **client_options(settings),
                                group_id=f"r-{uuid.uuid4().hex[:8]}", auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        found: dict[str, str] = {}
        for _ in range(10):
            for records in (await consumer.getmany(timeout_ms=300)).values():
                for record in records:
                    key = record.key.decode() if record.key else ""
                    if key in keys:
                        found[key] = dict(record.headers)["reason"].decode()
        return found
    finally:
        await consumer.stop()


async def test_encoded_word_injection_is_refused_and_nothing_injected_is_sent(settings, registry, org, publisher,
                                                                              pool, capture) -> None:
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    # A mailbox whose name (the From display name, not part of any request) carries the encoded word:
    # the registry refuses such a name now, so it is a row written before that rule.
    named = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port, profile=sender.profile)
    with pytest.raises(InvalidInput, match="line breaks"):
        await registry.update_mailbox(org, named.email, name="Sales " + INJECTION)
    async with pool.acquire() as conn:
        await conn.execute("UPDATE mailbox SET name = $2 WHERE id = $1", named.mailbox_id, "Sales " + INJECTION)
    pdf = base64.b64encode(b"%PDF-1.4").decode()
    changes = {
        "subject": {"subject": "Grüße " + INJECTION},
        "filename": {"attachments": [{"filename": INJECTION, "content_base64": pdf}]},
        "x-header": {"headers": {"X-Campaign": INJECTION + " and enough words to need folding, past 78 characters"}},
        "content-id": {"html": "<img src='cid:x'>", "attachments": [
            {"filename": "x.png", "content_type": "image/png", "inline": True, "content_id": INJECTION, "content_base64": pdf}]},
    }
    raw, refused = [], {}
    for field, change in changes.items():
        key = f"inject-{field}-{uuid.uuid4().hex[:8]}"
        body = json.loads(encode_event(outbound(org, mailbox_id=sender.mailbox_id, idempotency_key=key)))
        body["data"].update(change)
        raw.append((json.dumps(body).encode(), key))
        refused[key] = field
    await publish_raw(publisher, raw)
    from_named = outbound(org, mailbox_id=named.mailbox_id, subject="Grüße from a mailbox with a bad name")
    threaded = outbound(org, mailbox_id=sender.mailbox_id, subject="Re: your order",
                        headers={"In-Reply-To": OUTLOOK_ID, "References": f"<first@example.com> {OUTLOOK_ID}",
                                 "List-Unsubscribe": UNSUBSCRIBE, "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"})
    await publish(publisher, from_named, threaded)
    await dispatch(settings)

    keys = [*refused, from_named.data.idempotency_key, threaded.data.idempotency_key]
    reader = await finals(settings, keys)
    for key, field in refused.items():
        final = reader.final(key)
        assert (final.status, final.reason) == ("rejected", "header_injection"), (field, final)
    assert await _dead_letter_reasons(settings, set(refused)) == {key: "header_injection" for key in refused}
    final = reader.final(from_named.data.idempotency_key)
    assert (final.status, final.reason) == ("failed", "header_injection"), final
    assert reader.final(threaded.data.idempotency_key).status == "sent"

    messages = capture.messages()
    assert len(messages) == 1  # only the threaded reply went out
    (message,) = messages
    assert "attacker@evil.example" not in message.rcpt_tos
    assert message.header("Bcc") is None and message.header("X-Injected") is None
    head = message.raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    assert f"\r\nIn-Reply-To: {OUTLOOK_ID}\r\n" in head
    assert f"\r\nReferences: <first@example.com>\r\n {OUTLOOK_ID}\r\n" in head
    assert f"\r\nList-Unsubscribe: {UNSUBSCRIBE}\r\n" in head
    assert "=?" not in head  # nothing RFC 2047-encoded: the subject and the names are ASCII
