"""`conduit dead-letters` as an operator runs it: a refused request, listed with its reason, replayed
while still refused (dead-lettered again, naming the first), then replayed once mended and sent once."""
from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from prometheus_client import REGISTRY

from conduit.peers.smtp import CaptureSmtpServer
from shared.events.envelope import encode_event
from shared.lifecycle import run_service
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.cli import conduit_cli
from tests.support.dispatch import dispatch, dispatch_running, finals, outbound, publish, publish_raw, sending_mailbox
from tests.support.waiting import eventually


async def _letters(settings: Settings, *args: str) -> list[dict]:
    code, out, err = await conduit_cli(settings, "dead-letters", "list", "email.outbound", "--json", *args)
    assert code == 0, err
    return json.loads(out)


async def test_a_refused_request_is_listed_replayed_and_sent_once_mended(
        settings: Settings, registry: Registry, org, publisher, tmp_path) -> None:
    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port, approve=False)
        async with dispatch_running(settings):
            key = f"dlq-{uuid.uuid4().hex[:8]}"
            # `conduit send` refuses it before publishing; another system publishes it all the same.
            code, out, err = await conduit_cli(settings, "send", "--org", org.name, "--from", sender.email, "--to",
                                               "someone@customer.example", "--subject", "Refused first", "--text", "Hello.",
                                               "--key", key, "--wait", "--json")
            assert code == 2 and "dispatch would refuse this request (email_not_approved)" in err, (out, err)
            await publish(publisher, outbound(org, idempotency_key=key, sender_email=sender.email,
                                              to=["someone@customer.example"], subject="Refused first", text="Hello."))
            reader = await finals(settings, [key])
            assert reader.final(key).reason == "email_not_approved"

            (first,) = await _letters(settings)
            assert (first["reason"], first["subject"], first["key"], first["event_type"], first["replayed_at"]) == \
                ("email_not_approved", key, key, "email.outbound", None)
            assert first["original_offset"] is not None and first["consumer_group"] and "approved" in first["error"]
            code, out, err = await conduit_cli(settings, "dead-letters", "list")
            assert code == 0 and "email_not_approved" in out and "1 dead letter, 1 not replayed." in out, err

            # Replayed while the cause stands: refused again, as a new dead letter that names the first.
            code, out, err = await conduit_cli(settings, "dead-letters", "replay", "email.outbound", "--dry-run")
            assert code == 0 and "would replay 1 dead letter" in out, err
            code, out, err = await conduit_cli(settings, "dead-letters", "replay", "email.outbound")
            assert code == 0 and "replayed 1 dead letter to email.outbound" in out, err
            letters = await eventually(lambda: _pair(settings), what="the replay dead-lettered again")
            assert letters[0]["replayed_at"] is not None and letters[1]["replayed_at"] is None
            assert letters[1]["replay_of"] == f"email.outbound.dlq:{first['partition']}:{first['offset']}"
            assert letters[1]["reason"] == "email_not_approved" and letters[1]["subject"] == key

            # Mended: only the dead letter not replayed yet goes again, and is sent.
            await registry.update_mailbox(org, sender.email, email_approved=True)
            code, out, err = await conduit_cli(settings, "dead-letters", "replay", "email.outbound", "--reason", "email_not_approved")
            assert code == 0 and "replayed 1 dead letter" in out and "1 replayed before, left out" in out, err
            await eventually(lambda: _status(settings, org.name, key), what="the replayed request sent")
            code, out, err = await conduit_cli(settings, "dead-letters", "replay", "email.outbound")
            assert code == 0 and "nothing to replay on email.outbound (2 replayed before" in out, err
            assert await _letters(settings, "--pending") == []

            # Mistakes get one line each, never a traceback.
            for args, says in [(("replay", "email.nowhere"), "no topic 'email.nowhere'"),
                               (("replay", "email.outbound", "--at", "first"), "--at needs PARTITION:OFFSET"),
                               (("replay", "email.outbound", "--at", "3:999999"), "no dead letter of email.outbound at 3:999999")]:
                code, out, err = await conduit_cli(settings, "dead-letters", *args)
                assert code == 2 and says in err and "Traceback" not in err, (args, err)
        (message,) = capture.messages()
        assert message.header("Subject").startswith("Refused first")


async def test_requests_refused_by_a_rule_do_not_count_toward_the_dead_letter_limit(
        settings: Settings, registry: Registry, org, publisher, tmp_path) -> None:
    """A client flooding dispatch with requests for a mailbox it does not have is answered, each
    request, and does not stop dispatch (which, restarted, would meet the same requests again)."""
    limited = settings.model_copy(update={"dlq_limit_per_minute": 5})
    counted = ("conduit_events_dead_lettered_total", {"service": "dispatch", "topic": "email.outbound",
                                                        "reason": "unknown_mailbox"})
    before = REGISTRY.get_sample_value(*counted) or 0
    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        refused = [outbound(org, sender_email="nobody@example.com") for _ in range(12)]
        good = outbound(org, sender_email=sender.email)
        await publish(publisher, *refused, good)
        await dispatch(limited)
        reader = await finals(limited, [e.data.idempotency_key for e in [*refused, good]])
        assert {reader.final(e.data.idempotency_key).reason for e in refused} == {"unknown_mailbox"}
        assert reader.final(good.data.idempotency_key).status == "sent" and len(capture.messages()) == 1
    letters = await _letters(limited)
    assert sorted(x["key"] for x in letters) == sorted(e.data.idempotency_key for e in refused)
    assert {x["reason"] for x in letters} == {"unknown_mailbox"}
    assert REGISTRY.get_sample_value(*counted) - before == 12


async def test_input_dispatch_cannot_read_past_the_dead_letter_limit_stops_it(settings: Settings, org, publisher) -> None:
    """Undecodable events and requests that do not match the schema still count: a bad deploy stops."""
    from shared.consumer import DeadLetterLimitExceeded

    limited = settings.model_copy(update={"dlq_limit_per_minute": 5})
    no_recipients = []
    for _ in range(3):
        event = json.loads(encode_event(outbound(org, sender_email="nobody@example.com")))
        event["data"]["to"] = []
        no_recipients.append((json.dumps(event).encode(), event["data"]["idempotency_key"]))
    await publish_raw(publisher, [(b"not json", "garbage")] * 3 + no_recipients)
    with pytest.raises(DeadLetterLimitExceeded):
        await dispatch(limited)


async def _pair(settings: Settings) -> list[dict] | None:
    letters = await _letters(settings)
    return letters if len(letters) == 2 else None


async def _status(settings: Settings, org_name: str, key: str) -> bool:
    code, out, err = await conduit_cli(settings, "outbound", "show", key, "--org", org_name, "--json")
    assert code == 0, err
    return json.loads(out)["status"] == "sent"


async def test_any_dead_letter_is_read_even_one_that_is_not_json(settings: Settings, pool, publisher) -> None:
    from shared import deadletters

    assert await deadletters.read(settings, pool, "email.received") == []
    await publisher.publish_raw("email.received.dlq", b"\xff not an event", "mailbox-1", [
        ("original_topic", b"x.email.received"), ("original_partition", b"2"), ("original_offset", b"41"),
        ("reason", b"undecodable"), ("error", b"not JSON"), ("consumer_group", b"conduit-evaluate")])
    (letter,) = await deadletters.read(settings, pool, "email.received", values=True)
    assert (letter.reason, letter.error, letter.original_partition, letter.original_offset, letter.key, letter.event_type) == \
        ("undecodable", "not JSON", 2, 41, "mailbox-1", None)
    assert letter.value == b"\xff not an event" and letter.replayed_at is None
    assert deadletters.dead_letter_topics("email.received.dlq") == ["email.received"]
    for n in range(2):
        await publisher.publish_raw("email.received.dlq", b"{}", f"mailbox-{n + 2}", [("reason", b"schema_error")])
    code, out, err = await conduit_cli(settings, "dead-letters", "list", "email.received.dlq", "--limit", "2")
    assert code == 0 and "3 dead letters, 3 not replayed (the last 2 shown: --limit for more)." in out, err
    assert "undecodable" not in out and out.count("schema_error") == 2


async def test_a_received_message_refused_by_evaluate_is_explained_and_replayed(
        settings: Settings, registry: Registry, org, pool, publisher, dovecot) -> None:
    """`conduit message why` names the dead letter when no decision was recorded; once the raw
    message is in the store, replaying it makes the decision and the activity."""
    import hashlib

    from services.evaluate.service import EvaluateService
    from shared.events.envelope import Envelope
    from shared.events.payloads import EmailReceivedV1
    from shared.rawstore import store_raw
    from tests.support.mailboxes import imap_profile, message, ready_mailbox

    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot)
    raw = message("Lost and found", message_id=f"<{uuid.uuid4().hex}@customer.example>")
    message_id = raw.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode()
    event = Envelope[EmailReceivedV1](type="email.received", schema_version=1, producer="tests", organization_id=org.id,
                                      data=EmailReceivedV1(mailbox_id=box.id, source="imap", uid=1, size=len(raw),
                                                           raw_sha256=hashlib.sha256(raw).hexdigest(), message_id=message_id))
    await publisher.publish("email.received", event, str(box.id))
    await run_service(EvaluateService(settings), burst=True)   # the raw message is not stored: refused

    code, out, err = await conduit_cli(settings, "message", "why", message_id, "--org", org.name)
    assert code == 1 and "refused by evaluate" in out and "[raw_missing]" in out, (out, err)
    assert "conduit dead-letters replay email.received --at " in out

    async with pool.acquire() as conn:
        await store_raw(conn, [raw])
    code, out, err = await conduit_cli(settings, "dead-letters", "replay", "email.received")
    assert code == 0 and "replayed 1 dead letter" in out and "raw_missing" in out, err
    await run_service(EvaluateService(settings), burst=True)
    code, out, err = await conduit_cli(settings, "message", "why", message_id, "--org", org.name)
    assert code == 0 and f"{box.email}: tracked" in out, (out, err)


async def test_a_replay_is_handled_only_by_the_group_that_refused_it(settings: Settings, pool, publisher) -> None:
    """The topic's other consumers handled the original: they skip the replay, so nothing is counted twice."""
    from shared import deadletters
    from shared.consumer import EventConsumer
    from shared.events.envelope import Envelope, encode_event
    from shared.events.payloads import MailboxEventV1
    from shared.events.topics import MAILBOX_EVENTS

    event = Envelope[MailboxEventV1](type=MAILBOX_EVENTS.name, schema_version=1, producer="tests", organization_id=uuid.uuid4(),
                                     data=MailboxEventV1(mailbox_id=uuid.uuid4(), kind="tested"))
    await publisher.publish_raw("mailbox.events.dlq", encode_event(event), "m-1",
                                [("reason", b"transient_bug"), ("consumer_group", b"refusing-group")])
    await deadletters.replay(settings, pool, await deadletters.read(settings, pool, "mailbox.events", values=True))

    async def seen_by(group: str) -> list[uuid.UUID]:
        seen: list[uuid.UUID] = []

        async def handle(deliveries):
            seen.extend(d.event.event_id for d in deliveries)
            return []
        consumer = EventConsumer(settings, MAILBOX_EVENTS, group_id=group, handler=handle, publisher=publisher)
        await consumer.start()
        try:
            await asyncio.wait_for(consumer.run(asyncio.Event(), burst=True), timeout=60)
            assert consumer.processed == 1   # its offset is committed either way
        finally:
            await consumer.stop()
        return seen

    assert await seen_by("refusing-group") == [event.event_id]
    assert await seen_by(f"other-{uuid.uuid4().hex[:6]}") == []
