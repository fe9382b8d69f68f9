"""The mailbox health aggregate against the real broker: faust's consumer group, table, changelog
and the `mailbox.health` topic, and the table recovered from its changelog after a restart."""
from __future__ import annotations

import hashlib
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer
from prometheus_client import REGISTRY

from services.evaluate.health import HealthAggregate, start_health
from shared.events.envelope import Envelope, decode_event
from shared.events.payloads import ActivityCreatedV1, EmailReceivedV1, MailboxEventV1, MailboxHealthV1
from shared.events.topics import ACTIVITY_CREATED, EMAIL_RECEIVED, MAILBOX_EVENTS, MAILBOX_HEALTH
from shared.kafka import Publisher, client_options, topic_name
from shared.settings import Settings
from tests.support.waiting import eventually


def _mailbox_event(org: uuid.UUID, mailbox: uuid.UUID, kind: str, **fields: Any) -> Envelope[MailboxEventV1]:
    return Envelope[MailboxEventV1](type=MAILBOX_EVENTS.name, schema_version=1, producer="tests", organization_id=org,
                                    data=MailboxEventV1(mailbox_id=mailbox, kind=kind, **fields))


def _received(org: uuid.UUID, mailbox: uuid.UUID, uid: int) -> Envelope[EmailReceivedV1]:
    return Envelope[EmailReceivedV1](type=EMAIL_RECEIVED.name, schema_version=1, producer="tests", organization_id=org,
                                     data=EmailReceivedV1(mailbox_id=mailbox, source="imap", uid=uid, size=100,
                                                          raw_sha256=hashlib.sha256(str(uid).encode()).hexdigest()))


def _activity(org: uuid.UUID, mailboxes: list[uuid.UUID]) -> Envelope[ActivityCreatedV1]:
    return Envelope[ActivityCreatedV1](type=ACTIVITY_CREATED.name, schema_version=1, producer="tests", organization_id=org,
                                       data=ActivityCreatedV1(activity_id=uuid.uuid4(), message_id=f"<{uuid.uuid4()}@x>",
                                                              direction="incoming", status="received", subject="s",
                                                              from_address="a@example.com", to_addresses=[],
                                                              mailbox_ids=mailboxes))


class HealthReader:
    """Reads `mailbox.health` from the start; keeps the latest event per mailbox."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.latest: dict[uuid.UUID, MailboxHealthV1] = {}
        self.count = 0
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> "HealthReader":
        self._consumer = AIOKafkaConsumer(topic_name(self._settings, MAILBOX_HEALTH.name),
                                          **client_options(self._settings), auto_offset_reset="earliest",
                                          enable_auto_commit=False, group_id=None)
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._consumer is not None
        await self._consumer.stop()

    async def poll(self) -> None:
        assert self._consumer is not None
        for records in (await self._consumer.getmany(timeout_ms=100)).values():
            for r in records:
                event = decode_event(r.value, MAILBOX_HEALTH.envelope)
                assert r.key == str(event.data.mailbox_id).encode()
                self.latest[event.data.mailbox_id] = event.data
                self.count += 1


async def test_health_aggregate_publishes_and_recovers_after_restart(settings: Settings, publisher: Publisher) -> None:
    org, a, b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    health = await start_health(settings)
    try:
        await publisher.publish_raw(MAILBOX_EVENTS.name, b"not an event", str(a))
        await publisher.publish(MAILBOX_EVENTS.name, _mailbox_event(org, a, "created"), str(a))
        await publisher.publish(MAILBOX_EVENTS.name, _mailbox_event(
            org, a, "alert", direction="incoming", severity="warning", code="connection_failed", message="refused"), str(a))
        await publisher.publish(MAILBOX_EVENTS.name, _mailbox_event(
            org, a, "alert", direction="outgoing", severity="error", code="authentication_failed", message="535"), str(a))
        for uid in (1, 2, 3):
            await publisher.publish(EMAIL_RECEIVED.name, _received(org, a, uid), str(a))
        await publisher.publish(ACTIVITY_CREATED.name, _activity(org, [a, b]), str(org))
        await publisher.publish(MAILBOX_EVENTS.name, _mailbox_event(
            org, a, "alert", direction="incoming", severity="information", code="recovered", message="works again"), str(a))

        async with HealthReader(settings) as reader:
            async def settled() -> bool:
                await reader.poll()
                view_a, view_b = reader.latest.get(a), reader.latest.get(b)
                return bool(view_a and view_b and view_a.messages_received == 3 and view_a.activities_created == 1
                            and view_a.last_alert_code == "recovered" and view_b.activities_created == 1)

            await eventually(settled, timeout=60, what="mailbox.health to show every event")
            view = reader.latest[a]
            assert view.state == "failing"  # incoming recovered, outgoing still failing
            assert view.direction_states == {"incoming": "healthy", "outgoing": "failing"}
            assert view.failure_count == 1
            assert view.last_success_at is not None
            assert reader.latest[b].state == "healthy" and reader.latest[b].messages_received == 0

        assert health.dead_lettered == 1
        table_view = health.health(a)
        assert table_view is not None and table_view.to_payload() == view
        assert REGISTRY.get_sample_value("conduit_mailboxes_by_health", {"state": "failing"}) == 1
        assert REGISTRY.get_sample_value("conduit_mailboxes_by_health", {"state": "healthy"}) == 1
    finally:
        await health.stop()

    # While it is down: the outgoing direction recovers and one more message arrives.
    await publisher.publish(MAILBOX_EVENTS.name, _mailbox_event(org, a, "recovered", direction="outgoing"), str(a))
    await publisher.publish(EMAIL_RECEIVED.name, _received(org, a, 4), str(a))

    restarted: HealthAggregate = await start_health(settings)
    try:
        async def recovered() -> bool:
            record = restarted.health(a)
            return bool(record and record.messages_received == 4 and record.state == "healthy")

        await eventually(recovered, timeout=60, what="the table recovered from its changelog and the new events applied")
        record = restarted.health(a)
        assert record is not None
        # Counted once each although faust may replay events after the restart.
        assert (record.messages_received, record.activities_created, record.failure_count) == (4, 1, 0)
        assert restarted.health(b) is not None and restarted.health(b).activities_created == 1
        assert restarted.count("healthy") == 2
        # The earlier events came back from the changelog: only the two new ones were applied now.
        assert restarted.applied == 2
    finally:
        await restarted.stop()
