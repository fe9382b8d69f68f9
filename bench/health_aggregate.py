"""Benchmark: the mailbox health aggregate (faust-streaming) against a plain aiokafka loop, on Tansu.

Starts its own Tansu broker, publishes N events first (70% `email.received`, 20% `activity.created`
naming one or two mailboxes, 10% `mailbox.events` alerts and recoveries; M mailboxes, 4 partitions),
then drains them with each contender in the same run:

- plain: one AIOKafkaConsumer on the three topics, the same pure core (``apply``) into a dict, one
  `mailbox.health` event per changed mailbox per batch of up to 500, producer flushed and offsets
  committed per batch (no changelog: its state dies with the process);
- faust: ``HealthAggregate`` as evaluate runs it (table with changelog, activities re-keyed by
  mailbox through an internal topic, batches of up to 500 events or 0.1 s, one `mailbox.health`
  event per changed mailbox per batch), with one record per producer batch (what Tansu needs for a
  correct table recovery) and with faust's default producer batching.

Rates are mailbox observations applied per second (an activity naming two mailboxes counts twice).
Also printed: the Tansu ListOffsets answer that makes default batching unsafe (see health.py).

For each: events/s from the first change to the last, and over the whole run including start and
group join.  Then each faust app is stopped and started again: the time until its table is
recovered, and how many mailboxes' recovered records differ from the plain loop's dict (0 = right).

    .venv/bin/python bench/health_aggregate.py [--events 20000] [--mailboxes 200]

Seen on 2026-11-27 (2 cores shared with other work, load average ~2; three runs of 20,000 events):
plain 22,605 / 18,200 / 22,574 ev/s; faust one record per batch 2,098 / 2,411 / 1,306 ev/s
(0.09x / 0.13x / 0.06x), 0 mailboxes wrong after each restart; faust default batching
2,160 / 1,789 / 1,692 ev/s, 1 / 5 / 0 of 200 mailboxes wrong after the restart (Tansu's
ListOffsets: 4 for 13 records).  Restart to a recovered table: 20-21 s, of which ~15 s is the group
waiting out the stopped member (Tansu's first generation is 0 and aiokafka sends no LeaveGroup for
generation 0) and ~5 s the rebalance timeout.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

from conduit.broker import EmbeddedBroker  # noqa: E402
from services.evaluate.health import HealthAggregate, MailboxHealth, Source, apply, health_event, observations  # noqa: E402
from shared.events.envelope import Envelope, decode_event, encode_event  # noqa: E402
from shared.events.payloads import ActivityCreatedV1, EmailReceivedV1, MailboxEventV1  # noqa: E402
from shared.events.topics import ACTIVITY_CREATED, EMAIL_RECEIVED, MAILBOX_EVENTS, MAILBOX_HEALTH  # noqa: E402
from shared.kafka import Publisher, client_options, ensure_topics, topic_name  # noqa: E402
from shared.settings import Settings  # noqa: E402

SOURCES = (MAILBOX_EVENTS, EMAIL_RECEIVED, ACTIVITY_CREATED)


def make_events(count: int, mailboxes: int, seed: int = 11) -> tuple[list[tuple[str, bytes, str]], int]:
    """(topic, value, key) in publishing order, and the number of observations they make."""
    rng = random.Random(seed)
    orgs = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(max(1, mailboxes // 20))]
    boxes = [(uuid.UUID(int=rng.getrandbits(128)), orgs[i % len(orgs)]) for i in range(mailboxes)]
    out, observed = [], 0
    for i in range(count):
        box, org = rng.choice(boxes)
        roll = rng.random()
        if roll < 0.7:
            event = Envelope[EmailReceivedV1](
                type=EMAIL_RECEIVED.name, schema_version=1, producer="bench", organization_id=org,
                data=EmailReceivedV1(mailbox_id=box, source="imap", uid=i + 1, size=7000,
                                     raw_sha256=hashlib.sha256(str(i).encode()).hexdigest(), message_id=f"<{i}@bench>"))
            out.append((EMAIL_RECEIVED.name, encode_event(event), str(box)))
            observed += 1
        elif roll < 0.9:
            same_org = [b for b, o in boxes if o == org]
            named = list(dict.fromkeys([box, rng.choice(same_org)]))
            event = Envelope[ActivityCreatedV1](
                type=ACTIVITY_CREATED.name, schema_version=1, producer="bench", organization_id=org,
                data=ActivityCreatedV1(activity_id=uuid.UUID(int=rng.getrandbits(128)), message_id=f"<{i}@bench>",
                                       direction="incoming", status="received", subject="Quote", from_address="a@x.example",
                                       to_addresses=["b@y.example"], mailbox_ids=named))
            out.append((ACTIVITY_CREATED.name, encode_event(event), str(org)))
            observed += len(named)
        else:
            kind = rng.choice(["warning", "error", "recovered"])
            data = (MailboxEventV1(mailbox_id=box, kind="alert", direction="incoming", severity="information",
                                   code="recovered", message=f"works again ({i})") if kind == "recovered" else
                    MailboxEventV1(mailbox_id=box, kind="alert", direction=rng.choice(["incoming", "outgoing"]),
                                   severity=kind, code="connection_failed", message=f"refused (failure {i})"))
            event = Envelope[MailboxEventV1](type=MAILBOX_EVENTS.name, schema_version=1, producer="bench",
                                             organization_id=org, data=data)
            out.append((MAILBOX_EVENTS.name, encode_event(event), str(box)))
            observed += 1
    return out, observed


def summary(h: MailboxHealth) -> tuple:
    """What must agree between contenders (timing fields may differ by cross-topic interleaving)."""
    return (h.state, dict(h.direction_states), h.failure_count, h.messages_received, h.activities_created,
            h.last_alert_message)


async def run_plain(settings: Settings, expected: int) -> tuple[float, float, dict[str, MailboxHealth]]:
    names = {topic_name(settings, t.name): t for t in SOURCES}
    consumer = AIOKafkaConsumer(*names, **client_options(settings), group_id=f"{settings.topic_prefix}plain",
                                enable_auto_commit=False, auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20,
                                session_timeout_ms=10_000, heartbeat_interval_ms=1_000, rebalance_timeout_ms=5_000)
    producer = AIOKafkaProducer(**client_options(settings), acks="all", enable_idempotence=False, linger_ms=2)
    health_topic = topic_name(settings, MAILBOX_HEALTH.name)
    table: dict[str, MailboxHealth] = {}
    applied, first = 0, None
    started = time.perf_counter()
    await producer.start()
    await consumer.start()
    try:
        while applied < expected:
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            changed: dict[str, MailboxHealth] = {}
            for tp, records in batches.items():
                topic = names[tp.topic]
                for r in records:
                    envelope = decode_event(r.value, topic.envelope)
                    source = Source(topic.name, r.partition, r.offset)
                    for o in observations(topic.name, envelope):
                        key = str(o.mailbox_id)
                        after = apply(table.get(key), o, source)
                        if after is not None:
                            table[key] = changed[key] = after
                            applied += 1
                            first = first or time.perf_counter()
            # As the aggregate does: one health event per changed mailbox per batch, then commit.
            for key, after in changed.items():
                await producer.send(health_topic, encode_event(health_event(after)), key=key.encode())
            await producer.flush()
            if batches:
                await consumer.commit({tp: records[-1].offset + 1 for tp, records in batches.items()})
        done = time.perf_counter()
    finally:
        await consumer.stop()
        await producer.stop()
    return expected / (done - first), expected / (done - started), table


async def run_faust(settings: Settings, expected: int, *, one_record_batches: bool,
                    truth: dict[str, MailboxHealth]) -> dict[str, float]:
    first_last: list[float] = []  # the first and the last change's time

    def on_change(_: MailboxHealth) -> None:
        now = time.perf_counter()
        if not first_last:
            first_last.append(now)
        first_last[1:] = [now]

    aggregate = HealthAggregate(settings, one_record_batches=one_record_batches, on_change=on_change)
    started = time.perf_counter()
    await aggregate.start()
    try:
        deadline = time.monotonic() + 600
        while aggregate.applied < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if aggregate.applied < expected:
            raise RuntimeError(f"faust applied {aggregate.applied} of {expected} changes in 600 s")
        first, last = first_last[0], first_last[-1]
        result = {"rate": expected / (last - first), "wall": expected / (last - started)}
        await asyncio.sleep(4)  # past faust's commit interval (2.8 s), as a running service would be
    finally:
        await aggregate.stop()
    restarted = HealthAggregate(settings, one_record_batches=one_record_batches)
    t0 = time.perf_counter()
    await restarted.start()
    try:
        deadline = time.monotonic() + 120
        while not restarted.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        result["recovery_s"] = time.perf_counter() - t0
        await asyncio.sleep(3)  # anything faust replays after the restart is applied (or skipped) by now
        recovered = {str(r.mailbox_id): r for r in restarted.records()}
        result["wrong"] = sum(1 for k, v in truth.items() if k not in recovered or summary(recovered[k]) != summary(v))
        result["replayed_changes"] = restarted.applied
    finally:
        await restarted.stop()
    return result


async def list_offsets_check(settings: Settings) -> tuple[int, int, int]:
    """Records written in one batch after 3 single ones: (records, ListOffsets latest, fetch high watermark)."""
    from aiokafka import TopicPartition

    name = topic_name(settings, "list-offsets-check")
    await ensure_topics(settings, [name])
    producer = AIOKafkaProducer(**client_options(settings), acks="all", enable_idempotence=False, linger_ms=50)
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False, auto_offset_reset="earliest")
    await producer.start()
    await consumer.start()
    try:
        tp = TopicPartition(name, 0)
        for _ in range(3):
            await producer.send_and_wait(name, b"x", key=b"k", partition=0)
        futures = [await producer.send(name, b"x", key=b"k", partition=0) for _ in range(10)]
        for f in futures:
            await f
        consumer.assign([tp])
        while await consumer.getmany(tp, timeout_ms=500):
            pass
        return 13, (await consumer.end_offsets([tp]))[tp], consumer.highwater(tp)
    finally:
        await consumer.stop()
        await producer.stop()


async def bench(args: argparse.Namespace) -> None:
    events, expected = make_events(args.events, args.mailboxes)
    with tempfile.TemporaryDirectory() as tmp:
        broker = EmbeddedBroker(Path(tmp) / "tansu.log")
        await broker.start()
        try:
            base = Settings(CONDUIT_STATE_DIR=tmp, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers, CONDUIT_TOPIC_PARTITIONS=4)
            settings = base.model_copy(update={"topic_prefix": f"b{uuid.uuid4().hex[:8]}."})
            await ensure_topics(settings)
            written, listed, highwater = await list_offsets_check(settings)
            print(f"Tansu: {written} records in one partition (3 single, then 10 in one batch): "
                  f"ListOffsets latest = {listed}, fetch high watermark = {highwater}")
            publisher = Publisher(settings, client_id="bench")
            await publisher.start()
            t0 = time.perf_counter()
            for i in range(0, len(events), 1000):
                await publisher.publish_many(events[i:i + 1000])
            await publisher.stop()
            print(f"{args.events} events published in {time.perf_counter() - t0:.1f} s -> {expected} mailbox observations, "
                  f"{args.mailboxes} mailboxes, 4 partitions")
            plain_rate, plain_wall, truth = await run_plain(settings, expected)
            print(f"  plain aiokafka loop + dict:                      {plain_rate:8.0f} ev/s  (whole run {plain_wall:6.0f})")
            for one in (True, False):
                s = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}f{int(one)}."})
                # The faust app reads the same source topics: give it their physical names under its own prefix.
                await ensure_topics(s)
                publisher = Publisher(s, client_id="bench")
                await publisher.start()
                for i in range(0, len(events), 1000):
                    await publisher.publish_many(events[i:i + 1000])
                await publisher.stop()
                r = await run_faust(s, expected, one_record_batches=one, truth=truth)
                label = "faust, one record per batch (Tansu-safe)" if one else "faust, default batching"
                print(f"  {label + ':':48} {r['rate']:8.0f} ev/s  (whole run {r['wall']:6.0f})  "
                      f"ratio {r['rate'] / plain_rate:4.2f}x; restart: table recovered in {r['recovery_s']:.1f} s, "
                      f"{r['wrong']} of {len(truth)} mailboxes wrong, {r['replayed_changes']} changes after restart")
        finally:
            await broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--mailboxes", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("faust").setLevel(logging.ERROR)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
