"""The mailbox health aggregate: the monitoring view of every mailbox's health.

It reads `mailbox.events` (tests, alerts, back-offs, recoveries), `email.received` (new mail only:
an event marked ``refiled`` announces again a message received before) and `activity.created`,
keeps one health record per mailbox and publishes it on `mailbox.health` after each batch of events
that changed it (key: the mailbox id, so the topic's latest event per key is the current view).
The rules are in ``docs/topics/mailbox.health.md``.

Two halves:

- a pure core (``MailboxHealth``, the observations, ``apply``): plain data in, plain data out, no
  clock and no I/O, unit-tested on its own;
- the stream wiring (``HealthAggregate``, ``start_health``): a faust-streaming app whose table
  (changelog-backed, partitioned like the source topics by mailbox id) holds the records.
  `activity.created` is keyed by organization, so a small agent re-keys each activity by mailbox
  onto an internal topic first; the table is only ever written from partitions keyed by mailbox.

Delivery is at least once (faust flushes the changelog and the published events before it commits
offsets).  The effect is exactly once all the same: a record remembers, per source partition, the
highest offset it has applied, and a replayed event is a no-op.  A mailbox's events on one topic
all come from one partition (the key is the mailbox, or for activities its organization), so that
offset only grows.

Tansu 0.6 (the embedded broker) answers ListOffsets "latest" with the base offset of a partition's
last record batch plus one instead of the high watermark, so faust's table recovery, which reads
each changelog partition up to that offset, drops the rest of the last batch (seen: 1 of 200
mailboxes recovered wrong).  The app's producer therefore sends one record per batch
(``one_record_batches``, the default; a real Kafka does not need it).

Cost (``bench/health_aggregate.py``): faust's per-event machinery makes this about a tenth as fast
as a plain aiokafka loop running the same core (~1,300-2,400 against ~18,000-22,600 events/s here),
and it shares the host service's event loop and core.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping
from uuid import UUID

from shared.consumer import DeadLetterGate
from shared.deadletters import meant_for_another
from shared.errors import InvalidInput
from shared.events.envelope import Envelope, decode_event, encode_event
from shared.events.payloads import MailboxHealthV1
from shared.events.topics import ACTIVITY_CREATED, EMAIL_RECEIVED, MAILBOX_EVENTS, MAILBOX_HEALTH, dead_letter
from shared.kafka import bootstrap_servers, ensure_topics, tls_context, topic_name
from shared.metrics import EVENTS_DEAD_LETTERED, MAILBOXES_BY_HEALTH
from shared.settings import Settings

log = logging.getLogger(__name__)


WINDOW_SECONDS = 60
# From best to worst: a mailbox is as healthy as its worst direction.
STATES = ("healthy", "degraded", "backing_off", "failing")
MAILBOX_WIDE = "mailbox"

# --- the pure core -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """Where an observation was read: the replay guard's key and position."""

    topic: str
    partition: int
    offset: int

    @property
    def key(self) -> str:
        return f"{self.topic}/{self.partition}"


@dataclass(frozen=True, slots=True)
class MailboxSignal:
    """A `mailbox.events` event."""

    mailbox_id: UUID
    organization_id: UUID
    at: datetime
    kind: str
    direction: str | None = None
    severity: str | None = None
    code: str | None = None
    message: str | None = None
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A message pulled from the mailbox: its incoming synchronization works."""

    mailbox_id: UUID
    organization_id: UUID
    at: datetime
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class ActivityRecorded:
    """An email activity recorded through the mailbox."""

    mailbox_id: UUID
    organization_id: UUID
    at: datetime
    activity_id: UUID
    correlation_id: str | None = None


Observation = MailboxSignal | MessageReceived | ActivityRecorded


@dataclass(frozen=True, slots=True)
class MailboxHealth:
    """One mailbox's health record, as the table keeps it."""

    mailbox_id: UUID
    organization_id: UUID
    updated_at: datetime
    direction_states: Mapping[str, str] = field(default_factory=dict)
    direction_failures: Mapping[str, int] = field(default_factory=dict)
    last_success_at: datetime | None = None
    last_alert_code: str | None = None
    last_alert_message: str | None = None
    last_alert_severity: str | None = None
    last_alert_at: datetime | None = None
    messages_received: int = 0
    activities_created: int = 0
    window_start: datetime | None = None
    window_received: int = 0
    window_activities: int = 0
    previous_received: int = 0      # the complete window just before window_start
    previous_activities: int = 0
    applied: Mapping[str, int] = field(default_factory=dict)  # "topic/partition" -> highest offset applied

    @property
    def state(self) -> str:
        return max(self.direction_states.values(), key=STATES.index, default="healthy")

    @property
    def failure_count(self) -> int:
        return sum(self.direction_failures.values())

    def to_payload(self, window_seconds: int = WINDOW_SECONDS) -> MailboxHealthV1:
        per_minute = 60.0 / window_seconds
        return MailboxHealthV1(
            mailbox_id=self.mailbox_id, state=self.state, direction_states=dict(self.direction_states),
            failure_count=self.failure_count, last_success_at=self.last_success_at,
            last_alert_code=self.last_alert_code, last_alert_message=self.last_alert_message,
            last_alert_severity=self.last_alert_severity, last_alert_at=self.last_alert_at,
            messages_received=self.messages_received, activities_created=self.activities_created,
            window_seconds=window_seconds, window_start=self.window_start,
            messages_received_per_minute=self.previous_received * per_minute,
            activities_created_per_minute=self.previous_activities * per_minute,
            updated_at=self.updated_at,
        )

    def to_dict(self) -> dict[str, Any]:
        """The table's JSON value."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, UUID):
                value = str(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MailboxHealth":
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name not in cls.__dataclass_fields__:
                continue  # a field an older or newer version wrote: ignored, as payloads do
            if name in ("mailbox_id", "organization_id"):
                value = UUID(value)
            elif name in _DATETIME_FIELDS and value is not None:
                value = datetime.fromisoformat(value)
            values[name] = value
        return cls(**values)


_DATETIME_FIELDS = {"updated_at", "last_success_at", "last_alert_at", "window_start"}


def apply(health: MailboxHealth | None, observation: Observation, source: Source | None = None, *,
          window_seconds: int = WINDOW_SECONDS) -> MailboxHealth | None:
    """The record after ``observation``, or None when nothing changes (a replay, or an event that
    says nothing about health).  ``health`` is None for a mailbox not seen before."""
    if health is not None and source is not None and health.applied.get(source.key, -1) >= source.offset:
        return None  # already applied: delivery is at least once
    created = health is None
    if health is None:
        health = MailboxHealth(observation.mailbox_id, observation.organization_id, observation.at)
    if isinstance(observation, MailboxSignal):
        after = _signal(health, observation)
    elif isinstance(observation, MessageReceived):
        after = _count(health, observation.at, "received", window_seconds)
        after = replace(after, last_success_at=_latest(after.last_success_at, observation.at))
    else:
        after = _count(health, observation.at, "activities", window_seconds)
    if after == health and not created:
        return None
    after = replace(after, updated_at=_latest(health.updated_at, observation.at))
    if source is not None:
        after = replace(after, applied={**after.applied, source.key: source.offset})
    return after


def _signal(health: MailboxHealth, s: MailboxSignal) -> MailboxHealth:
    direction = s.direction or MAILBOX_WIDE
    recovered = s.kind == "recovered" or (s.kind == "alert" and s.code == "recovered")
    if s.kind == "alert":
        health = replace(health, last_alert_code=s.code, last_alert_message=s.message,
                         last_alert_severity=s.severity or "warning", last_alert_at=s.at)
    if recovered or (s.kind == "tested" and s.severity != "error"):
        return _direction(health, direction, "healthy", failures=0, success_at=s.at)
    if s.kind == "tested":  # a failed test; the alert that the registry raises with it counts the failure
        return _direction(health, direction, "failing")
    if s.kind == "backoff":
        # Waiting to try again: worse than degraded, not as bad as failing (from the third failure
        # on, the alert before it made the direction failing, and a back-off does not make it better).
        now = health.direction_states.get(direction, "healthy")
        return _direction(health, direction, max(now, "backing_off", key=STATES.index))
    if s.kind == "alert" and s.severity != "information":
        # The registry warns for the first failures and raises an error from the third on.
        state = "failing" if s.severity == "error" else "degraded"
        return _direction(health, direction, state, failures=health.direction_failures.get(direction, 0) + 1)
    return health  # created, updated, an information alert: nothing about health


def _direction(health: MailboxHealth, direction: str, state: str, *, failures: int | None = None,
               success_at: datetime | None = None) -> MailboxHealth:
    changes: dict[str, Any] = {"direction_states": {**health.direction_states, direction: state}}
    if failures is not None:
        changes["direction_failures"] = {**health.direction_failures, direction: failures}
    if success_at is not None:
        changes["last_success_at"] = _latest(health.last_success_at, success_at)
    return replace(health, **changes)


def _count(health: MailboxHealth, at: datetime, what: str, window_seconds: int) -> MailboxHealth:
    """Count one message or activity in the totals and in its tumbling window (by event time)."""
    total = "messages_received" if what == "received" else "activities_created"
    current, previous = f"window_{what}", f"previous_{what}"
    changes: dict[str, Any] = {total: getattr(health, total) + 1}
    start = datetime.fromtimestamp(math.floor(at.timestamp() / window_seconds) * window_seconds, timezone.utc)
    if health.window_start is None or start > health.window_start:
        adjacent = health.window_start is not None and (start - health.window_start).total_seconds() == window_seconds
        changes.update(
            window_start=start,
            window_received=0, window_activities=0,
            previous_received=health.window_received if adjacent else 0,
            previous_activities=health.window_activities if adjacent else 0,
        )
        changes[current] = 1
    elif start == health.window_start:
        changes[current] = getattr(health, current) + 1
    elif (health.window_start - start).total_seconds() == window_seconds:
        changes[previous] = getattr(health, previous) + 1  # late, but its window is the one reported
    return replace(health, **changes)  # older than that: counted in the totals only


def _latest(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b > a else a


def observations(topic: str, envelope: Envelope[Any]) -> list[Observation]:
    """What one decoded event says about mailboxes (``topic`` is the catalogue name, unprefixed)."""
    data, at, org, corr = envelope.data, envelope.occurred_at, envelope.organization_id, envelope.correlation_id
    if topic == MAILBOX_EVENTS.name:
        return [MailboxSignal(data.mailbox_id, org, at, data.kind, data.direction, data.severity, data.code,
                              data.message, corr)]
    if topic == EMAIL_RECEIVED.name:
        if data.refiled:
            # A message received before, announced again to be filed under a folder rule's record:
            # counted once already, when it arrived (and its activity, if new, is counted as one).
            return []
        return [MessageReceived(data.mailbox_id, org, at, corr)]
    if topic == ACTIVITY_CREATED.name:
        return [ActivityRecorded(m, org, at, data.activity_id, corr) for m in dict.fromkeys(data.mailbox_ids)]
    raise ValueError(f"the health aggregate does not read {topic}")


def health_event(health: MailboxHealth, *, window_seconds: int = WINDOW_SECONDS,
                 correlation_id: str | None = None) -> Envelope[MailboxHealthV1]:
    return Envelope[MailboxHealthV1](
        type=MAILBOX_HEALTH.name, schema_version=MAILBOX_HEALTH.schema_version, producer="evaluate",
        correlation_id=correlation_id, organization_id=health.organization_id,
        data=health.to_payload(window_seconds),
    )


def _activity_to_json(o: ActivityRecorded, source: Source) -> bytes:
    return json.dumps({
        "mailbox_id": str(o.mailbox_id), "organization_id": str(o.organization_id), "at": o.at.isoformat(),
        "activity_id": str(o.activity_id), "correlation_id": o.correlation_id,
        "source": [source.topic, source.partition, source.offset],
    }).encode()


def _activity_from_json(raw: bytes) -> tuple[ActivityRecorded, Source]:
    d = json.loads(raw)
    return (ActivityRecorded(UUID(d["mailbox_id"]), UUID(d["organization_id"]), datetime.fromisoformat(d["at"]),
                             UUID(d["activity_id"]), d["correlation_id"]), Source(*d["source"]))


# --- the stream wiring ---------------------------------------------------------------------------


class HealthAggregate:
    """The faust app: an agent re-keying activities by mailbox, and the agent keeping the table.

    The constructor does no I/O; ``start`` creates the topics, starts the app (it joins its own
    consumer group, named after the app, and recovers the table from its changelog: ``ready``
    says when); ``stop`` finishes the batch in flight, flushes, commits and leaves the group.
    """

    TABLE = "mailbox-health"

    def __init__(self, settings: Settings, *, window_seconds: int = WINDOW_SECONDS,
                 one_record_batches: bool = True, batch_size: int = 500, batch_seconds: float = 0.1,
                 on_change: Callable[[MailboxHealth], None] | None = None) -> None:
        self.settings = settings
        self.batch_size = batch_size
        self.batch_seconds = batch_seconds
        self.window_seconds = window_seconds
        self.one_record_batches = one_record_batches
        self.on_change = on_change
        self.app_id = f"{settings.topic_prefix}conduit-health"
        self.applied = 0          # observations that changed a record
        self.batches = 0
        self.dead_lettered = 0
        self._gate = DeadLetterGate(settings.dlq_limit_per_minute, self.app_id)
        self._counted: dict[str, int] = {}
        self._counted_at = -1e9
        self.app: Any = None
        self.table: Any = None

    @property
    def rekeyed_topic(self) -> str:
        return f"{self.app_id}-activities-by-mailbox"

    def _build(self) -> None:
        import faust

        s = self.settings
        partitions = s.topic_partitions
        options: dict[str, Any] = dict(
            broker=[f"kafka://{h.strip()}" for h in bootstrap_servers(s).split(",")],
            broker_credentials=_credentials(s),
            store="memory://",  # the changelog is the durable copy; a restart reads it back
            topic_partitions=partitions, topic_replication_factor=s.topic_replication_factor,
            consumer_auto_offset_reset="earliest",
            # Short group timings: Tansu holds the first join for the whole rebalance timeout.
            broker_rebalance_timeout=5, broker_session_timeout=10, broker_heartbeat_interval=1,
            producer_acks=-1, web_enabled=False, autodiscover=False,
            # faust would otherwise create "<app id>-data" in the working directory.
            datadir=str(s.state_dir / "faust"),
        )
        if self.one_record_batches:
            options["producer_max_batch_size"] = 1
        app = faust.App(self.app_id, **options)
        raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw", partitions=partitions)
        names = {topic_name(s, t.name): t.name for t in (MAILBOX_EVENTS, EMAIL_RECEIVED)}
        mailbox_keyed = app.topic(*names, self.rekeyed_topic, **raw)
        activities = app.topic(topic_name(s, ACTIVITY_CREATED.name), **raw)
        rekeyed = app.topic(self.rekeyed_topic, **raw)
        health = app.topic(topic_name(s, MAILBOX_HEALTH.name), **raw)
        self._dead_letters = {t: app.topic(topic_name(s, dead_letter(t)), **raw) for t in
                              (MAILBOX_EVENTS.name, EMAIL_RECEIVED.name, ACTIVITY_CREATED.name)}
        # Batches span partitions, so a record's changelog partition comes from its key (the same
        # murmur2 partitioner every Conduit producer uses), not from the event being processed.
        self.table = table = app.Table(self.TABLE, default=None, partitions=partitions, key_type=str,
                                       use_partitioner=True)
        envelopes = {t.name: t.envelope for t in (MAILBOX_EVENTS, EMAIL_RECEIVED, ACTIVITY_CREATED)}

        async def by_mailbox(stream: Any) -> None:
            async for event in stream.events():
                m = event.message
                try:
                    envelope = decode_event(event.value, envelopes[ACTIVITY_CREATED.name])
                except InvalidInput as exc:
                    await self._dead_letter(ACTIVITY_CREATED.name, m, exc)
                    continue
                source = Source(ACTIVITY_CREATED.name, m.partition, m.offset)
                for o in observations(ACTIVITY_CREATED.name, envelope):
                    await rekeyed.send(key=str(o.mailbox_id).encode(), value=_activity_to_json(o, source))

        async def aggregate(stream: Any) -> None:
            # In batches: each mailbox's record is read once, every event of the batch applied in
            # order, then written (changelog) and published once.  faust acknowledges the batch's
            # events only after this loop body returns, and flushes both sends before it commits.
            async for batch in stream.take_events(self.batch_size, within=self.batch_seconds):
                changed: dict[str, MailboxHealth] = {}
                correlation: dict[str, str | None] = {}
                self.batches += 1
                for event in batch:
                    for observation, source in await self._observations(event, names, envelopes):
                        key = str(observation.mailbox_id)
                        before = changed.get(key)
                        if before is None:
                            stored = table.get(key)
                            before = MailboxHealth.from_dict(stored) if stored else None
                        after = apply(before, observation, source, window_seconds=self.window_seconds)
                        if after is not None:
                            changed[key] = after
                            correlation[key] = observation.correlation_id
                            self.applied += 1
                for key, after in changed.items():
                    table[key] = after.to_dict()
                    await health.send(key=key.encode(), value=encode_event(
                        health_event(after, window_seconds=self.window_seconds, correlation_id=correlation[key])))
                    if self.on_change is not None:
                        self.on_change(after)

        app.agent(activities, name=f"{self.app_id}.by_mailbox")(by_mailbox)
        app.agent(mailbox_keyed, name=f"{self.app_id}.aggregate")(aggregate)
        self.app = app

    async def _observations(self, event: Any, names: Mapping[str, str],
                            envelopes: Mapping[str, Any]) -> list[tuple[Observation, Source]]:
        m = event.message
        if m.topic == self.rekeyed_topic:
            return [_activity_from_json(event.value)]
        if meant_for_another(m.headers, self.app_id):
            return []   # a replay for the consumer that refused the event: the aggregate counted the original
        logical = names[m.topic]
        try:
            envelope = decode_event(event.value, envelopes[logical])
        except InvalidInput as exc:
            await self._dead_letter(logical, m, exc)
            return []
        source = Source(logical, m.partition, m.offset)
        return [(o, source) for o in observations(logical, envelope)]

    async def _dead_letter(self, topic: str, message: Any, error: InvalidInput) -> None:
        self._gate.admit(f"{topic} (health aggregate)", error)
        headers = dict(self._gate.headers(message.topic, message.partition, message.offset, error, message.headers))
        await self._dead_letters[topic].send(key=message.key, value=message.value or b"", headers=headers)
        self.dead_lettered += 1
        EVENTS_DEAD_LETTERED.labels("evaluate", topic, error.reason).inc()

    async def start(self) -> None:
        s = self.settings
        await ensure_topics(s, [topic_name(s, t) for t in (MAILBOX_EVENTS.name, EMAIL_RECEIVED.name,
                                                           ACTIVITY_CREATED.name, MAILBOX_HEALTH.name)]
                            + [topic_name(s, dead_letter(t)) for t in (MAILBOX_EVENTS.name, EMAIL_RECEIVED.name,
                                                                       ACTIVITY_CREATED.name)]
                            + [self.rekeyed_topic])
        self._build()
        await self.app.start()
        for state in STATES:
            MAILBOXES_BY_HEALTH.labels(state).set_function(lambda state=state: self._counts().get(state, 0))

    async def stop(self) -> None:
        for state in STATES:
            MAILBOXES_BY_HEALTH.labels(state).set_function(lambda: 0)
        if self.app is not None:
            await self.app.stop()

    def health(self, mailbox_id: UUID | str) -> MailboxHealth | None:
        """The record for a mailbox in a partition this replica owns (None otherwise)."""
        if self.table is None:
            return None
        stored = self.table.get(str(mailbox_id))
        return MailboxHealth.from_dict(stored) if stored else None

    def records(self) -> Iterable[MailboxHealth]:
        if self.table is None:
            return []
        return [MailboxHealth.from_dict(v) for v in self.table.values() if v]

    def count(self, state: str) -> int:
        return sum(1 for r in self.records() if r.state == state)

    def _counts(self) -> dict[str, int]:
        """Mailboxes per state for the gauge: one pass over the table per scrape, not one per label."""
        now = time.monotonic()
        if now - self._counted_at > 1.0:
            counts: dict[str, int] = {}
            for stored in (self.table.values() if self.table is not None else ()):
                if stored:
                    state = max(stored["direction_states"].values(), key=STATES.index, default="healthy")
                    counts[state] = counts.get(state, 0) + 1
            self._counted, self._counted_at = counts, now
        return self._counted

    @property
    def ready(self) -> bool:
        """The app owns partitions and its table is recovered."""
        return bool(self.app is not None and self.app.consumer.assignment()
                    and self.app.tables.recovery.completed.is_set())


def _credentials(settings: Settings) -> Any:
    import faust

    protocol = settings.kafka_security_protocol
    # The same context as every other Kafka client: KAFKA_SSL_CA_FILE's CAs, verified.
    context = tls_context(settings) if protocol in ("SSL", "SASL_SSL") else None
    if protocol.startswith("SASL_"):
        # PLAIN when no mechanism is named, as the other Kafka clients (shared.kafka.client_options).
        password = settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
        return faust.SASLCredentials(username=settings.kafka_sasl_username, password=password,
                                     mechanism=settings.kafka_sasl_mechanism or "PLAIN", ssl_context=context)
    if context is not None:
        return faust.SSLCredentials(context)
    return None


async def start_health(settings: Settings, **options: Any) -> HealthAggregate:
    """Start the aggregate beside a service (evaluate); ``await handle.stop()`` before the service stops."""
    handle = HealthAggregate(settings, **options)
    try:
        await handle.start()
    except BaseException:
        await handle.stop()
        raise
    return handle
