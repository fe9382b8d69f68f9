"""Dispatch through the real service: events on the broker, DispatchService in burst mode, an aiosmtpd
capture server (AUTH, STARTTLS with a trustme certificate, scripted 451/550/dropped connections),
and the outcomes read back from `email.status`, the dead-letter topic, the sink and the database."""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
import uuid
from pathlib import Path

import asyncpg
import pytest
import trustme
from aiokafka import AIOKafkaConsumer
from pydantic import SecretStr

from conduit.peers.smtp import CaptureSmtpServer
from shared.events.envelope import encode_event
from shared.kafka import Publisher, client_options, topic_name
from shared.rawstore import store_raw
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.dispatch import (
    StatusReader,
    dead_worker,
    dispatch,
    dispatch_running,
    finals,
    orphan_row,
    outbound,
    publish,
    publish_raw,
    sending_mailbox,
)
from tests.support.waiting import eventually


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": base / "ca.pem", "cert": base / "cert.pem", "key": base / "key.pem"}
    ca.cert_pem.write_to_path(files["ca"])
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    cert.private_key_pem.write_to_path(files["key"])
    return files


@pytest.fixture
def capture(tmp_path):
    """A plain capture server; tests that need AUTH and TLS start their own."""
    with CaptureSmtpServer(tmp_path / "capture") as server:
        yield server


async def test_sent_with_auth_starttls_status_lifecycle_and_tracked_activity(
        settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool, tmp_path, tls_files) -> None:
    password = "s3cret"
    # The server's login, which the mailbox's credentials name.
    email = f"alice-{uuid.uuid4().hex[:6]}@example.com"
    server = CaptureSmtpServer(tmp_path / "tls", tls_cert=tls_files["cert"], tls_key=tls_files["key"],
                               require_auth=True, users={email: password})
    with server:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=server.port, tls="starttls",
                                       ca_file=str(tls_files["ca"]), password=password)
        await registry.set_credentials(org, sender.email, email, SecretStr(password))
        regarding = uuid.uuid4()
        event = outbound(org, mailbox_id=sender.mailbox_id, to=["buyer@customer.example"], cc=["cc@customer.example"],
                         bcc=["hidden@customer.example"], subject="Your invoice", headers={"X-Campaign": "q4", "Reply-To": "billing@example.com"},
                         regarding={"kind": "account", "id": str(regarding)})
        await publish(publisher, event)
        await dispatch(settings)
        key = event.data.idempotency_key
        reader = await finals(settings, [key])
        assert reader.statuses(key) == ["pending_send", "sending", "sent"]
        final = reader.final(key)
        assert final.smtp_code == 250 and final.activity_id and final.message_id
        (message,) = await server.wait_for_messages(1)
    assert message.tls and message.login == email
    assert message.mail_from == sender.email
    assert sorted(message.rcpt_tos) == ["buyer@customer.example", "cc@customer.example", "hidden@customer.example"]
    assert message.header("Message-ID") == f"<{final.message_id}>"
    assert message.header("From").endswith(f"<{sender.email}>")
    assert message.header("Bcc") is None and message.header("X-Campaign") == "q4"
    subject = message.header("Subject")
    assert subject.startswith("Your invoice CRM:") and len(subject.split("CRM:")[1]) == 7
    async with pool.acquire() as conn:
        activity = await conn.fetchrow("SELECT * FROM email_activity WHERE id = $1", final.activity_id)
        linked = await conn.fetchval("SELECT mailbox_id FROM email_activity_mailbox WHERE activity_id = $1", final.activity_id)
        row = await conn.fetchrow("SELECT * FROM outbound_email WHERE organization_id = $1 AND idempotency_key = $2", org.id, key)
    assert activity["direction"] == "outgoing" and activity["status"] == "sent"
    assert activity["message_id"] == final.message_id and activity["subject"] == subject
    assert activity["tracking_token"] == "CRM:" + subject.split("CRM:")[1]
    assert activity["regarding_id"] == regarding and linked == sender.mailbox_id
    assert row["status"] == "sent" and row["smtp_code"] == 250 and row["worker_id"] is None
    created = await _topic_values(settings, "activity.created")
    assert any(v["data"]["activity_id"] == str(final.activity_id) and v["data"]["direction"] == "outgoing" for v in created)


async def test_a_queue_sends_as_itself_by_its_address(settings: Settings, registry: Registry, org, publisher: Publisher,
                                                     tmp_path) -> None:
    """A queue's mailbox, named by the queue's address, sends as the queue, signing in with the
    queue mailbox's own login (which differs from the From address)."""
    login = f"svc-{uuid.uuid4().hex[:6]}@example.com"
    with CaptureSmtpServer(tmp_path / "queue", require_auth=True, users={login: "queue-pw"}) as server:
        queue = await sending_mailbox(registry, org, host="127.0.0.1", port=server.port, owner="queue", password="queue-pw")
        await registry.set_credentials(org, queue.email, login, SecretStr("queue-pw"))
        event = outbound(org, sender_email=queue.email)
        await publish(publisher, event)
        await dispatch(settings)
        assert (await finals(settings, [event.data.idempotency_key])).final(event.data.idempotency_key).status == "sent"
        (message,) = server.messages()
    assert message.login == login and message.mail_from == queue.email
    assert message.header("From").endswith(f"<{queue.email}>")


async def test_every_invalid_kind_is_rejected_with_its_reason_and_dead_lettered(
        settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool, capture) -> None:
    ok = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    inactive = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port, profile=ok.profile)
    await registry.update_mailbox(org, inactive.email, active=False)
    unapproved = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port, profile=ok.profile, approve=False)
    untested = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port, profile=ok.profile, enable=False)
    cases = {
        "header_not_allowed": outbound(org, mailbox_id=ok.mailbox_id, headers={"Bcc": "x@example.com"}),
        "too_large": outbound(org, mailbox_id=ok.mailbox_id, text="x" * 5000),
        "unknown_mailbox": outbound(org, sender_email="nobody@example.com"),
        "mailbox_inactive": outbound(org, mailbox_id=inactive.mailbox_id),
        "email_not_approved": outbound(org, sender_email=unapproved.email),
        "outgoing_not_enabled": outbound(org, mailbox_id=untested.mailbox_id),
    }
    # Attachments: inline content that is not base64, a reference to nothing, and a reference to
    # stored content that makes the message too large (found only with the stored size).
    async with pool.acquire() as conn:
        (big,) = await store_raw(conn, [uuid.uuid4().bytes * 250])   # 4,000 bytes
    attachment_cases = [
        ("bad_attachment", {"filename": "a.txt", "content_base64": "not base64!"}),
        ("attachment_not_found", {"filename": "b.pdf", "content_sha256": "0" * 64}),
        ("too_large", {"filename": "c.bin", "content_sha256": big}),
    ]
    more = [(reason, outbound(org, mailbox_id=ok.mailbox_id, attachments=[attachment])) for reason, attachment in attachment_cases]
    # Python's address parser recurses on nested comments: a Reply-To of 600 "(" used to raise
    # RecursionError, which held the whole batch for ever.
    more.append(("bad_address", outbound(org, mailbox_id=ok.mailbox_id, headers={"Reply-To": "(" * 600})))
    await publish(publisher, *cases.values(), *(e for _, e in more))
    good = outbound(org, mailbox_id=ok.mailbox_id)
    # Raw events a model would refuse: a schema error, a header injection, and envelopes that are
    # not this topic's v1 (another type, a version dispatch does not know, no event id of their own)
    # however well their payload would fit.
    schema_key, injection_key = f"schema-{uuid.uuid4().hex}", f"inject-{uuid.uuid4().hex}"
    foreign = {f"{name}-{uuid.uuid4().hex}": change for name, change in (
        ("type", {"type": "email.received"}), ("v2", {"schema_version": 2}), ("no-id", {"event_id": None}))}
    raw = []
    for key, data, envelope in ((schema_key, {"to": []}, {}),
                                (injection_key, {"subject": "Hi\r\nBcc: victim@example.com"}, {}),
                                *((key, {}, change) for key, change in foreign.items())):
        body = json.loads(encode_event(outbound(org, mailbox_id=ok.mailbox_id, idempotency_key=key)))
        body["data"].update(data)
        body.update(envelope)
        body = {k: v for k, v in body.items() if v is not None or k == "correlation_id"}
        raw.append((json.dumps(body).encode(), key))
    raw.append((b"not json at all", "garbage"))
    # A time before year 1 once in UTC: astimezone raised OverflowError, which ended the service at
    # every restart (pydantic turns only ValueError into a validation error).
    early = json.loads(encode_event(outbound(org, mailbox_id=ok.mailbox_id)))
    early["occurred_at"] = "0001-01-01T00:00:00+01:00"
    raw.append((json.dumps(early).encode(), "early"))
    await publish_raw(publisher, raw)
    await publish(publisher, good)
    await dispatch(settings, max_message_bytes=4096)
    expected = {**{e.data.idempotency_key: reason for reason, e in [*cases.items(), *more]},
                schema_key: "schema_error", injection_key: "header_injection", **dict.fromkeys(foreign, "schema_error")}
    reader = await finals(settings, [*expected, good.data.idempotency_key])
    for key, reason in expected.items():
        final = reader.final(key)
        assert final.status == "rejected" and final.reason == reason, (key, final)
        assert final.detail
    assert reader.final(good.data.idempotency_key).status == "sent"
    dead = await _topic_records(settings, "email.outbound.dlq")
    reasons = sorted(dict(r.headers)["reason"].decode() for r in dead)
    assert reasons == sorted([*expected.values(), "schema_error", "schema_error"])  # + the two undecodable ones
    assert len(capture.messages()) == 1


async def test_same_key_twice_is_sent_once(settings: Settings, registry: Registry, org, publisher: Publisher, capture) -> None:
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    first = outbound(org, sender_email=sender.email, idempotency_key="order-1")
    again = outbound(org, sender_email=sender.email, idempotency_key="order-1", subject="a replay")
    await publish(publisher, first, again)
    await dispatch(settings)
    await publish(publisher, first)  # replayed later, after it was sent
    await dispatch(settings)
    reader = await finals(settings, ["order-1"])
    assert reader.statuses("order-1") == ["pending_send", "sending", "sent"]
    assert len(capture.messages()) == 1


async def test_a_key_refused_twice_in_a_batch_is_recorded_not_retried_for_ever(
        settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool, capture) -> None:
    """A requester retrying a request dispatch refuses: both refusals announced, the last one the
    row's, and the batch goes on (it used to fail on every retry: a row written twice by one statement)."""
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    key = f"bad-{uuid.uuid4().hex[:8]}"
    good = outbound(org, sender_email=sender.email)
    await publish(publisher, outbound(org, sender_email=sender.email, idempotency_key=key, headers={"Sender": "x@example.com"}),
                  outbound(org, sender_email=sender.email, idempotency_key=key,
                           attachments=[{"filename": "a.txt", "content_base64": "not base64!"}]), good)
    await dispatch(settings)
    reader = await finals(settings, [key, good.data.idempotency_key])
    assert [(s.status, s.reason) for s in reader.by_key[key]] == [("rejected", "header_not_allowed"), ("rejected", "bad_attachment")]
    assert reader.final(good.data.idempotency_key).status == "sent"
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT reason FROM outbound_email WHERE organization_id = $1 AND idempotency_key = $2",
                                   org.id, key) == "bad_attachment"


async def test_a_key_reused_for_another_email_is_dead_lettered_and_the_first_email_stands(
        settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool, capture) -> None:
    """The same request again (the event redelivered, or published again with a new event id) is a
    no-op; another email under a key already used, in the same batch or after the first was sent, is
    dead-lettered as `idempotency_key_reused`, with no status (the first one's `sent` stays final)."""
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    key = f"invoice-{uuid.uuid4().hex[:8]}"
    first = outbound(org, sender_email=sender.email, idempotency_key=key, subject="Invoice 42", headers={"X-A": "1", "X-B": "2"})
    in_batch = outbound(org, sender_email=sender.email, idempotency_key=key, subject="Invoice 43")
    await publish(publisher, first, in_batch)
    await dispatch(settings)
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM outbound_email WHERE organization_id = $1 AND idempotency_key = $2", org.id, key)
    assert row["status"] == "sent" and row["request"]["subject"] == "Invoice 42"

    # Published again with a new event id, its headers in another order: the same request.
    republished = outbound(org, **{**first.data.model_dump(exclude_defaults=True), "headers": {"X-B": "2", "X-A": "1"}})
    reused = outbound(org, sender_email=sender.email, idempotency_key=key, to=["someone.else@customer.example"],
                      subject="Invoice 42", text="Another email.\n")
    await publish(publisher, first, republished, reused)
    await dispatch(settings)

    reader = await finals(settings, [key])
    assert reader.statuses(key) == ["pending_send", "sending", "sent"]
    (message,) = capture.messages()
    assert message.header("Subject").startswith("Invoice 42") and list(message.rcpt_tos) == ["rcpt@customer.example"]
    async with pool.acquire() as conn:
        assert dict(await conn.fetchrow("SELECT * FROM outbound_email WHERE id = $1", row["id"])) == dict(row)
    # (Each dispatch run reads the topic from its start, in its own group: `in_batch` is refused twice.)
    dead = [(json.loads(r.value)["event_id"], dict(r.headers)) for r in await _topic_records(settings, "email.outbound.dlq")]
    assert {event_id for event_id, _ in dead} == {str(in_batch.event_id), str(reused.event_id)}
    for event_id, headers in dead:
        assert headers["reason"] == b"idempotency_key_reused"
        assert key.encode() in headers["error"]
    assert b"(sent)" in next(h for e, h in dead if e == str(reused.event_id))["error"]


async def test_451_is_retried_then_sent(settings: Settings, registry: Registry, org, publisher: Publisher, capture) -> None:
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    capture.fail_next(1, "451")
    event = outbound(org, mailbox_id=sender.mailbox_id)
    await publish(publisher, event)
    await dispatch(settings, burst_horizon_seconds=5)
    key = event.data.idempotency_key
    reader = await finals(settings, [key])
    assert reader.statuses(key) == ["pending_send", "sending", "pending_send", "sending", "sent"]
    retry = reader.by_key[key][2]
    assert retry.smtp_code == 451 and retry.reason == "smtp_temporary" and "try later" in retry.smtp_reply
    assert reader.final(key).attempt == 2
    assert len(capture.messages()) == 1


async def test_temporary_failures_are_retried_until_the_deadline(settings: Settings, registry: Registry, org,
                                                                 publisher: Publisher, capture) -> None:
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    capture.fail_next(1000, "451")   # the server never recovers
    # Far enough ahead for the service's start and group join (~5 s), then a few retries.
    event = outbound(org, mailbox_id=sender.mailbox_id, deadline=datetime.now(timezone.utc) + timedelta(seconds=10))
    await publish(publisher, event)
    await dispatch(settings, burst_horizon_seconds=15, retry_base_seconds=0.3)
    key = event.data.idempotency_key
    reader = await finals(settings, [key])
    final = reader.final(key)
    assert (final.status, final.reason, final.smtp_code) == ("failed", "deadline_exceeded", 451)
    assert final.attempt >= 3 and "gave up at the deadline" in final.detail and "smtp_temporary" in final.detail
    assert reader.statuses(key)[:4] == ["pending_send", "sending", "pending_send", "sending"]
    assert capture.messages() == []


async def test_a_request_that_arrives_after_its_deadline_is_not_sent(settings: Settings, registry: Registry, org,
                                                                    publisher: Publisher, capture) -> None:
    """Dispatch was down while the request waited on the topic: it fails without an attempt."""
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    event = outbound(org, mailbox_id=sender.mailbox_id, deadline=datetime.now(timezone.utc) - timedelta(minutes=5))
    await publish(publisher, event)
    await dispatch(settings, burst_horizon_seconds=2)
    key = event.data.idempotency_key
    reader = await finals(settings, [key])
    assert reader.statuses(key) == ["pending_send", "failed"]
    final = reader.final(key)
    assert final.reason == "deadline_exceeded" and final.detail == "the deadline passed before it could be sent (after 0 attempt(s))"
    assert capture.messages() == []


async def test_dropped_connection_is_retried_and_sent_once(settings: Settings, registry: Registry, org,
                                                           publisher: Publisher, capture) -> None:
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    capture.fail_next(1, "drop", at="rcpt")
    event = outbound(org, mailbox_id=sender.mailbox_id)
    await publish(publisher, event)
    await dispatch(settings, burst_horizon_seconds=5)
    reader = await finals(settings, [event.data.idempotency_key])
    assert reader.final(event.data.idempotency_key).status == "sent"
    assert len(capture.messages()) == 1


async def test_550_fails_at_once_with_the_reply(settings: Settings, registry: Registry, org, publisher: Publisher, capture) -> None:
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    capture.fail_next(1, "550")
    event = outbound(org, mailbox_id=sender.mailbox_id)
    await publish(publisher, event)
    await dispatch(settings, burst_horizon_seconds=5)
    final = (await finals(settings, [event.data.idempotency_key])).final(event.data.idempotency_key)
    assert final.status == "failed" and final.smtp_code == 550 and final.reason == "smtp_permanent"
    assert "no such user" in final.smtp_reply and final.attempt == 1
    # `conduit outbound show` reads the same from the ledger, and says what it means.
    request = await registry.outbound_request(org, event.data.idempotency_key)
    assert (request.status, request.smtp_code, request.attempts) == ("failed", 550, 1)
    assert request.explanation().startswith("Failed (smtp_permanent): ") and "no such user" in request.explanation()


async def test_lost_reply_after_the_data_is_failed_not_resent(settings: Settings, registry: Registry, org,
                                                             publisher: Publisher, capture) -> None:
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    capture.fail_next(1, "store-drop")
    event = outbound(org, mailbox_id=sender.mailbox_id)
    await publish(publisher, event)
    await dispatch(settings, burst_horizon_seconds=5)
    final = (await finals(settings, [event.data.idempotency_key])).final(event.data.idempotency_key)
    assert final.status == "failed" and final.reason == "outcome_unknown"
    assert len(capture.messages()) == 1  # stored once by the server, never sent again
    request = await registry.outbound_request(org, f"<{final.message_id}>")   # found by its Message-ID too
    assert request.idempotency_key == event.data.idempotency_key
    assert "not resent" in request.explanation() and f"<{final.message_id}>" in request.explanation()


async def test_a_server_that_stops_answering_before_the_data_is_retried_and_sent_once(
        settings: Settings, registry: Registry, org, publisher: Publisher, capture) -> None:
    """No answer to RCPT: nothing can have been accepted, so the timeout is a temporary failure."""
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    capture.fail_next(1, "stall", at="rcpt")
    event = outbound(org, mailbox_id=sender.mailbox_id)
    await publish(publisher, event)
    await dispatch(settings, smtp_timeout_seconds=1, burst_horizon_seconds=5)
    key = event.data.idempotency_key
    reader = await finals(settings, [key])
    assert reader.statuses(key) == ["pending_send", "sending", "pending_send", "sending", "sent"], reader.by_key[key]
    assert len(capture.messages()) == 1


async def test_a_server_that_stops_answering_after_the_data_is_failed_not_resent(
        settings: Settings, registry: Registry, org, publisher: Publisher, capture) -> None:
    """No answer after the final dot within the data timeout: the server may have taken it (here it
    did), so it is never resent."""
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    capture.fail_next(1, "store-stall")
    event = outbound(org, mailbox_id=sender.mailbox_id)
    await publish(publisher, event)
    await dispatch(settings, smtp_timeout_seconds=1, smtp_data_timeout_seconds=1, burst_horizon_seconds=5)
    final = (await finals(settings, [event.data.idempotency_key])).final(event.data.idempotency_key)
    assert final.status == "failed" and final.reason == "outcome_unknown", final
    assert len(capture.messages()) == 1


@contextlib.asynccontextmanager
async def scanning(port: int, scan: float) -> AsyncIterator[int]:
    """A relay in front of the SMTP server on ``port`` that holds the server's answer to each
    final dot ``scan`` seconds, as a server that scans the content before it answers; yields the
    relay's port."""
    end_of_data = b"\r\n.\r\n"

    async def session(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", port)
        dots = [0, 0]  # final dots the client sent, and answers held for them

        async def to_server() -> None:
            tail = b""
            while data := await client_reader.read(65536):
                dots[0] += (tail + data).count(end_of_data)  # only a final dot ends a line in a lone "."
                tail = data[-4:]
                server_writer.write(data)
                await server_writer.drain()
            server_writer.close()

        async def to_client() -> None:
            while data := await server_reader.read(65536):
                if dots[1] < dots[0]:
                    dots[1] = dots[0]
                    await asyncio.sleep(scan)  # the slow peer under test, not a wait for something
                client_writer.write(data)
                await client_writer.drain()
            client_writer.close()

        with contextlib.suppress(ConnectionError):
            await asyncio.gather(to_server(), to_client())

    relay = await asyncio.start_server(session, "127.0.0.1", 0)
    async with relay:
        yield relay.sockets[0].getsockname()[1]


async def test_a_server_that_scans_before_answering_the_data_is_waited_for_and_sent(
        settings: Settings, registry: Registry, org, publisher: Publisher, capture) -> None:
    """The answer to the final dot comes after the SMTP timeout, within the data timeout (RFC 5321
    4.5.3.2.6 says 10 minutes): the message is sent, not failed as outcome_unknown."""
    async with scanning(capture.port, scan=2.5) as port:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=port)
        event = outbound(org, mailbox_id=sender.mailbox_id)
        await publish(publisher, event)
        await dispatch(settings, smtp_timeout_seconds=1, smtp_data_timeout_seconds=10, burst_horizon_seconds=5)
    key = event.data.idempotency_key
    reader = await finals(settings, [key])
    assert reader.statuses(key) == ["pending_send", "sending", "sent"], reader.by_key[key]
    assert reader.final(key).smtp_code == 250
    assert len(capture.messages()) == 1


async def test_a_lowered_connection_limit_takes_effect_without_a_restart(
        settings: Settings, registry: Registry, org, publisher: Publisher, capture) -> None:
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port, max_connections=4)

    async def send_burst(subject: str) -> set[str]:
        """40 requests at once; the SMTP sessions that carried them."""
        burst = [outbound(org, sender_email=sender.email, subject=subject) for _ in range(40)]
        await publish(publisher, *burst)
        await finals(settings, [e.data.idempotency_key for e in burst])
        return {m.session for m in capture.messages() if subject in (m.header("Subject") or "")}

    async with dispatch_running(settings, mailbox_refresh_seconds=0):
        assert len(await send_burst("before the change")) > 1
        await registry.update_profile(org, sender.profile, max_concurrent_connections=1)
        assert len(await send_burst("after the change")) == 1
    assert len(capture.messages()) == 80


async def test_auth_failure_backs_off_the_mailbox_and_success_clears_it(
        settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool, tmp_path) -> None:
    email = f"bob-{uuid.uuid4().hex[:6]}@example.com"
    with CaptureSmtpServer(tmp_path / "auth", users={email: "right"}, require_auth=True) as server:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=server.port, password="wrong")
        await registry.set_credentials(org, sender.email, email, SecretStr("wrong"))
        event = outbound(org, mailbox_id=sender.mailbox_id)
        key = event.data.idempotency_key
        waiting = await _after_one_attempt(settings, publisher, event)
        assert waiting.status == "pending_send" and waiting.reason == "authentication_failed"
        mailbox = await registry.mailbox(org, sender.email)
        assert mailbox.outgoing.error_count == 1 and mailbox.outgoing.backoff_until is not None
        assert any(a.code == "authentication_failed" for a in mailbox.alerts)
        # The administrator fixes the password and the back-off runs out: the request goes out.
        await registry.set_credentials(org, sender.email, email, SecretStr("right"))
        async with pool.acquire() as conn:
            await conn.execute("UPDATE mailbox SET outgoing_backoff_until = now() WHERE id = $1", sender.mailbox_id)
            await conn.execute("UPDATE outbound_email SET next_attempt_at = now() WHERE organization_id = $1", org.id)
        await dispatch(settings)
        reader = await finals(settings, [key])
        assert reader.final(key).status == "sent"
        assert len(server.messages()) == 1
    mailbox = await registry.mailbox(org, sender.email)
    assert mailbox.outgoing.error_count == 0 and any(a.code == "recovered" for a in mailbox.alerts)


async def test_rows_of_a_dead_worker_fail_as_outcome_unknown_only_if_they_may_have_left(
        settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool, capture) -> None:
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    request = outbound(org, mailbox_id=sender.mailbox_id, idempotency_key="orphan-2", subject="Claimed, never started").data
    async with pool.acquire() as conn:
        dead = await dead_worker(conn)
        # Cleared to reach its transport (started_at): it may have left, so it is never sent again.
        await orphan_row(conn, dead, org.id, sender.mailbox_id, "orphan-1", "conduit.x@example.com")
        # Claimed but never handed to a transport: nothing of it left, so another worker sends it.
        await orphan_row(conn, dead, org.id, sender.mailbox_id, "orphan-2", "conduit.y@example.com",
                         subject=request.subject, request=request.model_dump_json(), started=False)
    # What `conduit outbound show` says of each meanwhile.
    assert "outcome_unknown" in (await registry.outbound_request(org, "orphan-1")).explanation()
    assert "another sends it" in (await registry.outbound_request(org, "orphan-2")).explanation()
    await dispatch(settings, burst_horizon_seconds=2)
    reader = await finals(settings, ["orphan-1", "orphan-2"])
    final = reader.final("orphan-1")
    assert final.status == "failed" and final.reason == "outcome_unknown" and "conduit.x@example.com" in final.detail
    assert reader.statuses("orphan-2") == ["pending_send", "sending", "sent"]
    assert reader.by_key["orphan-2"][0].reason == "worker_stopped" and reader.final("orphan-2").attempt == 1
    (message,) = capture.messages()
    assert message.header("Message-ID") == "<conduit.y@example.com>" and message.header("Subject") == "Claimed, never started"


@pytest.mark.peers
async def test_smtp_sink_receives_every_request(settings: Settings, registry: Registry, org, publisher: Publisher, tmp_path) -> None:
    from conduit.peers.smtp import SmtpSink

    with SmtpSink(dump_dir=tmp_path / "dump") as sink:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=sink.port)
        events = [outbound(org, mailbox_id=sender.mailbox_id) for _ in range(300)]
        await publish(publisher, *events)
        await dispatch(settings)
        reader = await finals(settings, [e.data.idempotency_key for e in events])
        assert {reader.final(e.data.idempotency_key).status for e in events} == {"sent"}
        dumps = await eventually(lambda: _dumped(sink, 300), what="300 dumps")
    ids = {reader.final(e.data.idempotency_key).message_id for e in events}
    seen = [line.split(b"<", 1)[1].split(b">", 1)[0].decode() for d in dumps for line in d.splitlines()
            if line.lower().startswith(b"message-id:")]
    assert sorted(seen) == sorted(ids)


async def _dumped(sink, n: int):
    dumps = sink.dumped_messages()
    return dumps if len(dumps) >= n else None


async def _after_one_attempt(settings: Settings, publisher: Publisher, event):
    """Publish ``event``, run dispatch once, and return its status after that attempt (the third)."""
    await publish(publisher, event)
    await dispatch(settings)
    key = event.data.idempotency_key
    reader = StatusReader(settings)
    async with reader:
        await eventually(lambda: _has(reader, key, 3), what="the status after the first attempt")
    return reader.by_key[key][-1]


async def _has(reader: StatusReader, key: str, n: int) -> bool:
    await reader.poll()
    return len(reader.by_key.get(key, [])) >= n


async def _topic_records(settings: Settings, name: str):
    consumer = AIOKafkaConsumer(topic_name(settings, name), **client_options(settings), group_id=f"r-{uuid.uuid4().hex[:8]}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        records = []
        for _ in range(10):
            batches = await consumer.getmany(timeout_ms=300)
            records += [r for rs in batches.values() for r in rs]
        return records
    finally:
        await consumer.stop()


async def _topic_values(settings: Settings, name: str) -> list[dict]:
    return [json.loads(r.value) for r in await _topic_records(settings, name)]


async def test_an_outgoing_activity_is_recorded_once_per_message_id(registry: Registry, org, pool: asyncpg.Pool, capture) -> None:
    """Two sent rows with one Message-ID (the second recorded later): one activity, both rows point at
    it, linked once per mailbox; the second statement finds it without creating another."""
    from services.dispatch import ledger

    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    mid = f"conduit.{uuid.uuid4().hex}@example.com"

    def sent(request_id: uuid.UUID) -> tuple[ledger.Outcome, ledger.SentActivity]:
        return ledger.Outcome(request_id, "sent", transport="smtp", smtp_code=250, smtp_reply="ok"), ledger.SentActivity(
            id=uuid.uuid4(), request_id=request_id, organization_id=org.id, mailbox_id=sender.mailbox_id, message_id=mid,
            subject="Once", normalized_subject="once", from_address=sender.email, to=["a@customer.example"], cc=[],
            regarding_kind=None, regarding_id=None, tracking_token=None, thread_root=mid, preview="")

    async with pool.acquire() as conn:
        worker = await dead_worker(conn)
        ids = []
        for key in ("first", "second"):
            await orphan_row(conn, worker, org.id, sender.mailbox_id, f"{key}-{mid}", mid)
            ids.append(await conn.fetchval("SELECT id FROM outbound_email WHERE idempotency_key = $1", f"{key}-{mid}"))
        first_outcome, first_activity = sent(ids[0])
        written = await ledger.record_outcomes(conn, [first_outcome], worker, activities=[first_activity])
        assert written == {ids[0]: first_activity.id}
        second_outcome, second_activity = sent(ids[1])
        written = await ledger.record_outcomes(conn, [second_outcome], worker, activities=[second_activity])
        assert written == {ids[1]: first_activity.id}, "the activity already recorded is found, not doubled"
        assert await conn.fetchval("SELECT count(*) FROM email_activity WHERE organization_id = $1 AND message_id = $2",
                                   org.id, mid) == 1
        assert await conn.fetchval("SELECT count(*) FROM email_activity_mailbox WHERE activity_id = $1", first_activity.id) == 1
        assert {r["activity_id"] for r in await conn.fetch("SELECT activity_id FROM outbound_email WHERE id = ANY($1)", ids)} \
            == {first_activity.id}


async def test_xoauth2_sends_with_a_token_of_the_profiles_client_and_a_refused_token_is_not_reused(
        settings: Settings, registry: Registry, org, publisher: Publisher, tmp_path) -> None:
    from conduit.test_enable import _work_item
    from services.dispatch.transports import Transports
    from shared.errors import AuthenticationFailed
    from shared.registry.service import ProfileInput
    from tests.support.oauth import CLIENT_ID, CLIENT_SECRET, TokenEndpoint

    async with TokenEndpoint(count=2) as tokens:
        # The server knows only the second token: the first one is "revoked" before it expires.
        with CaptureSmtpServer(tmp_path / "oauth", xoauth2_tokens=tokens.tokens[1:], require_auth=True) as server:
            profile = f"oauth-{uuid.uuid4().hex[:6]}"
            await registry.add_profile(org, ProfileInput(
                name=profile, server_type="smtp", outgoing_host="127.0.0.1", outgoing_port=server.port,
                outgoing_tls="none", use_same_settings_for_outgoing=False, auth_method="oauth2",
                oauth_token_url=tokens.url, oauth_client_id=CLIENT_ID, oauth_client_secret=SecretStr(CLIENT_SECRET)))
            sender = await sending_mailbox(registry, org, host="127.0.0.1", port=server.port, profile=profile)
            work = await _work_item(registry, sender.mailbox_id)
            transports = Transports(timeout=5)
            try:
                with pytest.raises(AuthenticationFailed):
                    await transports.check(work)
                await transports.check(work)   # a new token, not the refused one again
            finally:
                await transports.close()
            assert tokens.issued == 2

            event = outbound(org, sender_email=sender.email)
            await publish(publisher, event)
            await dispatch(settings)
            reader = await finals(settings, [event.data.idempotency_key])
            assert reader.final(event.data.idempotency_key).status == "sent"
        assert len(server.messages()) == 1


async def test_attachments_inline_and_by_reference_are_sent(settings: Settings, registry: Registry, org,
                                                            publisher: Publisher, pool: asyncpg.Pool, capture) -> None:
    import base64
    from email import message_from_bytes, policy

    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    stored_bytes = b"%PDF-1.4 stored once, sent by reference\n" * 50
    async with pool.acquire() as conn:
        (sha,) = await store_raw(conn, [stored_bytes])
    event = outbound(org, mailbox_id=sender.mailbox_id, attachments=[
        {"filename": "note.txt", "content_type": "text/plain", "content_base64": base64.b64encode(b"inline note").decode()},
        {"filename": "report.pdf", "content_type": "application/pdf", "content_sha256": sha},
    ])
    await publish(publisher, event)
    await dispatch(settings)
    reader = await finals(settings, [event.data.idempotency_key])
    assert reader.final(event.data.idempotency_key).status == "sent"
    (captured,) = capture.messages()
    parts = {p.get_filename(): p.get_content() for p in message_from_bytes(captured.raw, policy=policy.default).iter_attachments()}
    assert parts == {"note.txt": "inline note", "report.pdf": stored_bytes}


@pytest.mark.parametrize("kind", ["ews", "graph"])
async def test_an_unreachable_exchange_server_backs_the_mailbox_off_with_an_alert(
        settings: Settings, registry: Registry, org, publisher: Publisher, kind: str) -> None:
    """As an SMTP server that refuses connections: the mailbox backs off with an alert, and the
    request waits for the back-off instead of failing message by message."""
    from conduit.peers.ports import free_port
    from shared.registry.service import ProfileInput

    port = free_port()   # nothing listens there
    profile = f"{kind}-{uuid.uuid4().hex[:6]}"
    if kind == "ews":
        spec = ProfileInput(name=profile, server_type="exchange_server", service_url=f"http://127.0.0.1:{port}/EWS/Exchange.asmx",
                            auth_method="mailbox_credentials")
    else:
        spec = ProfileInput(name=profile, server_type="exchange_online", service_url=f"http://127.0.0.1:{port}/v1.0",
                            auth_method="oauth2", oauth_token_url=f"http://127.0.0.1:{port}/token", oauth_client_id="app",
                            oauth_client_secret=SecretStr("secret"))
    await registry.add_profile(org, spec)
    email = f"ex-{uuid.uuid4().hex[:6]}@example.com"
    await registry.add_user(org, "Exchange user", email)
    if kind == "ews":
        await registry.set_credentials(org, email, email, SecretStr("pw"))
    await registry.update_mailbox(org, email, email_approved=True, profile=profile)
    mailbox = await registry.mailbox(org, email)
    await registry.record_test(mailbox.id, "outgoing", True, "ok")

    waiting = await _after_one_attempt(settings, publisher, outbound(org, mailbox_id=mailbox.id))
    assert waiting.status == "pending_send" and waiting.reason == "connection_failed", waiting
    mailbox = await registry.mailbox(org, email)
    assert mailbox.outgoing.error_count == 1 and mailbox.outgoing.backoff_until is not None
    assert any(a.code == "connection_failed" for a in mailbox.alerts)


async def test_requests_postgresql_could_not_store_are_refused_and_the_rest_is_sent(
        settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool, capture) -> None:
    """NUL characters and numbers JSON has no form for used to make the ledger's transaction fail on
    every retry, stopping the partitions of the batch for good: now each is refused with its reason
    (its payload stored cleaned), and the good request of the same batch is sent."""
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    cases = {
        "nul-text": ({"text": "a\u0000b"}, "schema_error"),
        "nul-subject": ({"subject": "a\u0000b"}, "header_injection"),
        "nul-regarding": ({"regarding": {"kind": "acc\u0000ount", "id": str(uuid.uuid4())}}, "schema_error"),
    }
    raw = []
    for key, (change, _) in cases.items():
        body = json.loads(encode_event(outbound(org, mailbox_id=sender.mailbox_id, idempotency_key=key)))
        body["data"].update(change)
        raw.append((json.dumps(body).encode(), key))
    # An unknown field holding 1e999, which Python's JSON reader takes as infinity.
    text = encode_event(outbound(org, mailbox_id=sender.mailbox_id, idempotency_key="huge-number")).decode()
    raw.append((text.replace('"track":true', '"track":true,"priority":1e999').encode(), "huge-number"))
    cases["huge-number"] = ({}, "schema_error")
    good = outbound(org, mailbox_id=sender.mailbox_id)
    await publish_raw(publisher, raw)
    await publish(publisher, good)
    await dispatch(settings)   # raised after three failed attempts before
    reader = await finals(settings, [*cases, good.data.idempotency_key])
    for key, (_, reason) in cases.items():
        final = reader.final(key)
        assert (final.status, final.reason) == ("rejected", reason), (key, final)
    assert reader.final(good.data.idempotency_key).status == "sent"
    async with pool.acquire() as conn:
        stored = {r["idempotency_key"]: r["request"] for r in await conn.fetch(
            "SELECT idempotency_key, request::text FROM outbound_email WHERE organization_id = $1 AND status = 'rejected'", org.id)}
    assert set(stored) == set(cases)
    assert "\ufffd" in stored["nul-subject"] and '"priority": null' in stored["huge-number"]


async def test_a_request_the_database_refuses_is_dead_lettered_alone(
        settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool, capture) -> None:
    """Whatever value PostgreSQL refuses (SQLSTATE class 22, here raised by a trigger for one key) fails
    that request alone: it is dead-lettered as `unstorable`, and the rest of its batch is sent."""
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    async with pool.acquire() as conn:
        await conn.execute("""CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
                              BEGIN IF NEW.idempotency_key = 'poison' THEN
                                  RAISE EXCEPTION 'value refused' USING ERRCODE = '22023'; END IF;
                              RETURN NEW; END $$;
                              CREATE TRIGGER refuse_poison BEFORE INSERT ON outbound_email
                              FOR EACH ROW EXECUTE FUNCTION refuse_poison()""")
    try:
        events = [outbound(org, mailbox_id=sender.mailbox_id, idempotency_key=k) for k in ("before", "poison", "after")]
        await publish(publisher, *events)
        await dispatch(settings)
    finally:
        async with pool.acquire() as conn:
            await conn.execute("DROP TRIGGER refuse_poison ON outbound_email; DROP FUNCTION refuse_poison()")
    reader = await finals(settings, ["before", "after"])
    assert [reader.final(k).status for k in ("before", "after")] == ["sent", "sent"]
    assert "poison" not in reader.by_key
    dead = [r for r in await _topic_records(settings, "email.outbound.dlq") if r.key == b"poison"]
    assert [dict(r.headers)["reason"] for r in dead] == [b"unstorable"]


async def test_a_recipient_deferred_with_4xx_is_sent_later_and_the_others_not_twice(
        settings: Settings, registry: Registry, org, publisher: Publisher, capture) -> None:
    """The server takes the message for one recipient and answers 451 for the other: the request goes
    back to pending_send, and the retry sends the same bytes to the deferred recipient only."""
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    capture.fail_next(1, "451", at="rcpt")   # the first RCPT is greylisted, the second accepted
    event = outbound(org, mailbox_id=sender.mailbox_id, to=["first@customer.example", "second@customer.example"])
    await publish(publisher, event)
    await dispatch(settings, burst_horizon_seconds=3)
    key = event.data.idempotency_key
    reader = await finals(settings, [key])
    assert reader.statuses(key) == ["pending_send", "sending", "pending_send", "sending", "sent"], reader.by_key[key]
    assert reader.by_key[key][2].reason == "recipients_deferred" and "first@customer.example" in reader.by_key[key][2].detail
    final = reader.final(key)
    assert final.reason is None and final.activity_id is not None, final
    first, second = capture.messages()
    assert (list(first.rcpt_tos), list(second.rcpt_tos)) == (["second@customer.example"], ["first@customer.example"])
    assert first.raw == second.raw   # the same message, Message-ID and Date included


async def test_a_deferred_recipient_refused_for_good_leaves_the_request_sent_to_the_others(
        settings: Settings, registry: Registry, org, publisher: Publisher, capture) -> None:
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
    capture.fail_next(1, "451", at="rcpt")
    event = outbound(org, mailbox_id=sender.mailbox_id, to=["first@customer.example", "second@customer.example"])
    await publish(publisher, event)
    await dispatch(settings, retry_base_seconds=1)   # returns with the retry not yet due
    capture.fail_next(1, "550", at="rcpt")   # the retry of the deferred one is refused for good
    await dispatch(settings, burst_horizon_seconds=3)
    key = event.data.idempotency_key
    final = (await finals(settings, [key])).final(key)
    assert (final.status, final.reason) == ("sent", "partially_sent") and "first@customer.example" in final.detail, final
    assert final.activity_id is not None
    assert [list(m.rcpt_tos) for m in capture.messages()] == [["second@customer.example"]]


async def test_a_mailbox_that_went_quiet_has_its_sessions_closed_without_another_send(
        settings: Settings, registry: Registry, org, publisher: Publisher) -> None:
    """Idle pools were closed only when something was sent: a replica whose mailboxes went quiet kept
    every session (a socket each, up to the profile's limit per mailbox) for good."""
    from services.dispatch.service import DispatchService
    from services.dispatch.settings import DispatchSettings
    from shared.lifecycle import run_service
    from tests.support.scripted_smtp import ScriptedSmtpServer, well_behaved

    async with ScriptedSmtpServer(well_behaved()) as server:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=server.port)
        service = DispatchService(settings, DispatchSettings(poll_seconds=0.1), group_id=f"d-{uuid.uuid4().hex[:8]}")
        stopping = asyncio.Event()
        running = asyncio.create_task(run_service(service, stopping=stopping))
        try:
            request = outbound(org, mailbox_id=sender.mailbox_id, subject="the last one for a while")
            await publish(publisher, request)
            await finals(settings, [request.data.idempotency_key], timeout=30)
            assert b"QUIT\r\n" not in server.lines
            assert service.transports is not None
            service.transports.smtp.idle_pool_timeout = 0.5   # instead of 5 minutes

            async def quit_said() -> bool:
                return b"QUIT\r\n" in server.lines
            await eventually(quit_said, timeout=15, what="the idle session closed with QUIT")
            assert len(server.contents) == 1
        finally:
            stopping.set()
            await running
