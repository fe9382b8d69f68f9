"""The mailbox health aggregate's pure core: states, counts, windows, replays, serialization."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from services.evaluate.health import (
    ActivityRecorded,
    MailboxHealth,
    MailboxSignal,
    MessageReceived,
    Source,
    apply,
    health_event,
    observations,
)
from shared.events.envelope import Envelope
from shared.events.payloads import ActivityCreatedV1, EmailReceivedV1, MailboxEventV1, MailboxHealthV1
from shared.events.topics import MAILBOX_HEALTH

ORG = uuid.UUID("3f0c8f5e-5a43-4c1e-9a58-0f1d2b7c9e10")
BOX = uuid.UUID("0b6f3c52-9d4e-4a39-8a8e-6c1d7f2e4a11")
T0 = datetime(2026, 11, 27, 9, 30, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def signal(kind: str, t: float = 0, **fields) -> MailboxSignal:
    return MailboxSignal(BOX, ORG, at(t), kind, **fields)


def run(*steps, health: MailboxHealth | None = None, window_seconds: int = 60) -> MailboxHealth:
    for step in steps:
        observation, source = step if isinstance(step, tuple) else (step, None)
        health = apply(health, observation, source, window_seconds=window_seconds) or health
    assert health is not None
    return health


def test_a_new_mailbox_is_healthy_with_nothing_counted() -> None:
    h = run(signal("created"))
    assert (h.state, h.failure_count, h.messages_received, h.last_success_at) == ("healthy", 0, 0, None)


def test_warnings_degrade_errors_fail_and_recovery_clears_the_direction() -> None:
    h = run(signal("alert", 1, direction="incoming", severity="warning", code="connection_failed", message="refused"))
    assert (h.state, h.failure_count, h.last_alert_code, h.last_alert_message) == ("degraded", 1, "connection_failed", "refused")
    h = run(signal("alert", 2, direction="incoming", severity="warning", code="connection_failed"),
            signal("alert", 3, direction="incoming", severity="error", code="connection_failed"), health=h)
    assert (h.state, h.failure_count, h.last_alert_severity, h.last_alert_at) == ("failing", 3, "error", at(3))
    h = run(signal("alert", 4, direction="incoming", severity="information", code="recovered", message="works again"), health=h)
    assert (h.state, h.failure_count, h.last_success_at, h.last_alert_code) == ("healthy", 0, at(4), "recovered")


def test_the_worst_direction_is_the_mailbox_state() -> None:
    h = run(signal("alert", 1, direction="incoming", severity="warning"),
            signal("backoff", 2, direction="outgoing"),
            signal("alert", 3, severity="error", code="mailbox_disabled"))
    assert h.direction_states == {"incoming": "degraded", "outgoing": "backing_off", "mailbox": "failing"}
    assert h.state == "failing" and h.failure_count == 2
    h = run(signal("recovered", 4), health=h)
    assert h.state == "backing_off"
    h = run(signal("recovered", 5, direction="outgoing"), health=h)
    assert h.state == "degraded"


def test_a_back_off_after_a_warning_is_backing_off_and_after_an_error_still_failing() -> None:
    """The registry sends its alert, then the back-off: the direction waits to try again."""
    h = run(signal("alert", 1, direction="incoming", severity="warning", code="connection_failed"),
            signal("backoff", 1, direction="incoming", severity="warning", code="connection_failed"))
    assert (h.state, h.failure_count) == ("backing_off", 1)
    h = run(signal("alert", 2, direction="incoming", severity="error", code="connection_failed"),
            signal("backoff", 2, direction="incoming", severity="error", code="connection_failed"), health=h)
    assert (h.state, h.failure_count) == ("failing", 2)
    h = run(signal("alert", 3, direction="incoming", severity="information", code="recovered"), health=h)
    assert h.state == "healthy"


def test_tests_set_the_direction_but_only_alerts_count_failures() -> None:
    h = run(signal("tested", 1, direction="incoming", severity="error", code="test_failed"))
    assert (h.state, h.failure_count) == ("failing", 0)
    h = run(signal("alert", 1, direction="incoming", severity="error", code="test_failed"), health=h)
    assert (h.state, h.failure_count) == ("failing", 1)
    h = run(signal("tested", 2, direction="incoming", severity="information", code="test_succeeded"), health=h)
    assert (h.state, h.failure_count, h.last_success_at) == ("healthy", 0, at(2))


def test_information_and_lifecycle_events_change_nothing() -> None:
    h = run(signal("created"))
    assert apply(h, signal("updated", 5, message="tracking")) is None
    assert apply(h, signal("alert", 6, severity="information", code="note")) is not None  # the last alert is news
    assert run(signal("alert", 6, severity="information", code="note"), health=h).state == "healthy"


def test_received_messages_count_and_are_successes() -> None:
    h = run(*(MessageReceived(BOX, ORG, at(t)) for t in (1, 2, 3)))
    assert (h.messages_received, h.last_success_at, h.updated_at) == (3, at(3), at(3))
    h = run(MessageReceived(BOX, ORG, at(-100)), health=h)  # late: counted, success time kept
    assert (h.messages_received, h.last_success_at, h.updated_at) == (4, at(3), at(3))


def test_rates_come_from_the_last_complete_tumbling_window() -> None:
    # T0 is on a minute boundary: window [T0, T0+60) gets 3 messages and 1 activity.
    h = run(*(MessageReceived(BOX, ORG, at(t)) for t in (0, 10, 59)), ActivityRecorded(BOX, ORG, at(30), uuid.uuid4()))
    assert (h.window_start, h.window_received, h.window_activities) == (T0, 3, 1)
    assert h.to_payload().messages_received_per_minute == 0  # no complete window yet
    h = run(MessageReceived(BOX, ORG, at(61)), health=h)
    p = h.to_payload()
    assert (p.window_start, p.messages_received_per_minute, p.activities_created_per_minute) == (at(60), 3.0, 1.0)
    h = run(MessageReceived(BOX, ORG, at(5)), health=h)  # late into the reported window
    assert h.to_payload().messages_received_per_minute == 4.0
    h = run(MessageReceived(BOX, ORG, at(-30)), health=h)  # older still: totals only
    assert (h.messages_received, h.previous_received) == (6, 4)
    h = run(MessageReceived(BOX, ORG, at(300)), health=h)  # a gap: the window before is empty
    assert (h.window_start, h.previous_received, h.window_received) == (at(300), 0, 1)


def test_rates_are_per_minute_whatever_the_window() -> None:
    h = run(*(MessageReceived(BOX, ORG, at(t)) for t in (0, 1, 2, 11)), window_seconds=10)
    assert h.to_payload(10).messages_received_per_minute == pytest.approx(18.0)


def test_a_replayed_event_is_a_no_op() -> None:
    first = Source("email.received", 2, 41)
    h = run((MessageReceived(BOX, ORG, at(1)), first))
    assert apply(h, MessageReceived(BOX, ORG, at(1)), first) is None
    assert apply(h, MessageReceived(BOX, ORG, at(1)), Source("email.received", 2, 40)) is None
    h = run((MessageReceived(BOX, ORG, at(2)), Source("email.received", 2, 42)),
            (MessageReceived(BOX, ORG, at(3)), Source("email.received", 3, 0)),  # partitions counted apart
            (signal("alert", 4, severity="warning"), Source("mailbox.events", 2, 42)), health=h)
    assert (h.messages_received, h.failure_count) == (3, 1)
    assert apply(h, signal("alert", 4, severity="warning"), Source("mailbox.events", 2, 42)) is None


def test_the_record_survives_its_table_encoding() -> None:
    h = run(signal("alert", 1, direction="incoming", severity="warning", code="c", message="m"),
            (MessageReceived(BOX, ORG, at(2)), Source("email.received", 0, 7)),
            ActivityRecorded(BOX, ORG, at(70), uuid.uuid4()))
    import json

    assert MailboxHealth.from_dict(json.loads(json.dumps(h.to_dict()))) == h
    assert MailboxHealth.from_dict({**h.to_dict(), "added_later": 1}) == h


def test_observations_from_each_topic() -> None:
    mailbox_event = Envelope[MailboxEventV1](type="mailbox.events", schema_version=1, producer="ingest", organization_id=ORG,
                                             occurred_at=T0, correlation_id="c1",
                                             data=MailboxEventV1(mailbox_id=BOX, kind="alert", direction="incoming",
                                                                 severity="error", code="x", message="y"))
    assert observations("mailbox.events", mailbox_event) == [
        MailboxSignal(BOX, ORG, T0, "alert", "incoming", "error", "x", "y", "c1")]
    received = Envelope[EmailReceivedV1](type="email.received", schema_version=1, producer="ingest", organization_id=ORG,
                                         occurred_at=T0, data=EmailReceivedV1(mailbox_id=BOX, source="pop3", size=1,
                                                                              raw_sha256="0" * 64))
    assert observations("email.received", received) == [MessageReceived(BOX, ORG, T0)]
    other, activity_id = uuid.uuid4(), uuid.uuid4()
    activity = Envelope[ActivityCreatedV1](type="activity.created", schema_version=1, producer="evaluate", organization_id=ORG,
                                           occurred_at=T0, data=ActivityCreatedV1(
                                               activity_id=activity_id, message_id="<m@x>", direction="incoming",
                                               status="received", subject="", from_address=None, to_addresses=[],
                                               mailbox_ids=[BOX, other, BOX]))
    assert observations("activity.created", activity) == [ActivityRecorded(BOX, ORG, T0, activity_id),
                                                          ActivityRecorded(other, ORG, T0, activity_id)]
    with pytest.raises(ValueError):
        observations("email.status", activity)


def test_the_published_event_validates_against_the_topic_schema() -> None:
    h = run(signal("alert", 1, direction="outgoing", severity="error", code="authentication_failed", message="535"),
            MessageReceived(BOX, ORG, at(2)))
    event = health_event(h, correlation_id="c1")
    decoded = MAILBOX_HEALTH.envelope.model_validate_json(event.model_dump_json())
    assert decoded.type == "mailbox.health" and decoded.organization_id == ORG
    assert isinstance(decoded.data, MailboxHealthV1)
    assert (decoded.data.state, decoded.data.direction_states, decoded.data.failure_count) == (
        "failing", {"outgoing": "failing"}, 1)
