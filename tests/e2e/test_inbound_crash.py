"""Never lost, never doubled: 5,000 messages in 20 IMAP mailboxes of two organizations while ingest
and evaluate, each its own process, are killed with SIGKILL at random points (three times each,
interleaved) and restarted.  One message in eight also reaches a second mailbox (of the same
organization or of the other one), so "one activity per message" is checked per organization.

Mail arrives in waves while the services run (and while they are down), so each ingest kill lands in
the middle of a sync: between storing raw bytes, publishing `email.received` and advancing the
folder state.  Each evaluate kill lands between a batch's transaction and its offset commit, or in
the middle of either.  The kill points are random progress levels read from PostgreSQL.

At the end: exactly one email activity per message and organization (counted per organization and
by Message-ID), linked to exactly the mailboxes of that organization it came through; exactly one
decision per (mailbox, message), tracked and pointing at that activity; every delivery recorded as
ingested once; every message announced on `email.received`; no internal error logged.
"""
from __future__ import annotations

import asyncio
import collections
import json
import random
import time
import uuid

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer

from shared.events.topics import EMAIL_RECEIVED
from shared.kafka import client_options, topic_name
from shared.registry.models import Organization
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.inbound import (
    ServiceProcess,
    activity_count,
    decided_count,
    ingested_count,
    service_env,
)
from tests.support.mailboxes import ReadyMailbox, imap_profile, message, ready_mailbox
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers

TOTAL = 5000
MAILBOXES = 20
OTHER_ORG_MAILBOXES = 5  # of the 20
COPY_EVERY = 8           # every 8th message also reaches a second mailbox
KILLS_EACH = 3
WAVES = 2 * KILLS_EACH + 1  # mail arrives in waves: one before each kill, the last after every kill
# Progress becomes visible in steps (evaluate commits a batch of up to 500 decisions at once, ingest a
# mailbox's batch), so reaching a progress level is always the moment just after a commit: a kill
# then lands between a transaction and what follows it (evaluate: the offset commit, so the batch is
# replayed onto its own effects).  Half the kills come a random time later instead, up to this many
# seconds, to land anywhere in the work that follows.  Not a wait for anything: nothing is expected
# to happen during it.
JITTER = {"ingest": 0.2, "evaluate": 0.4}


async def _at_least(count, n: int, *alive: ServiceProcess) -> int:
    for proc in alive:  # a service that died on its own fails the test at once, not at the deadline
        assert proc.alive(), f"{proc.service} exited by itself with {proc.proc.returncode}:\n{proc.tail()}"
    value = await count()
    return value if value >= n else 0


async def test_kill_9_ingest_and_evaluate_loses_nothing_and_doubles_nothing(
        settings: Settings, registry: Registry, org: Organization, dovecot, pool: asyncpg.Pool, tmp_path) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    other = await registry.add_organization(f"org-{uuid.uuid4().hex[:12]}")
    orgs = [org, other]
    boxes: list[ReadyMailbox] = []
    org_of: dict[uuid.UUID, uuid.UUID] = {}
    for o, count in ((org, MAILBOXES - OTHER_ORG_MAILBOXES), (other, OTHER_ORG_MAILBOXES)):
        await registry.add_profile(o, imap_profile(dovecot, min_polling_interval_seconds=1))
        for _ in range(count):
            boxes.append(await ready_mailbox(registry, o, dovecot, tracking="all"))
            org_of[boxes[-1].id] = o.id
    run = uuid.uuid4().hex[:8]
    # Message i goes to mailbox i % MAILBOXES (and every COPY_EVERY-th one to a second mailbox too);
    # its Message-ID names it.
    recipients: dict[str, list[ReadyMailbox]] = {}
    for i in range(TOTAL):
        first_box, second_box = boxes[i % MAILBOXES], boxes[(i * 7 + 3) % MAILBOXES]
        recipients[f"crash-{run}-{i}@customer.example"] = (
            [first_box, second_box] if i % COPY_EVERY == 0 and second_box is not first_box else [first_box])
    deliveries = sum(len(r) for r in recipients.values())
    expected_decisions = {(box.id, mid) for mid, rs in recipients.items() for box in rs}
    expected_activities: dict[uuid.UUID, dict[str, set[uuid.UUID]]] = {o.id: {} for o in orgs}
    for mid, rs in recipients.items():
        for box in rs:
            expected_activities[org_of[box.id]].setdefault(mid, set()).add(box.id)
    ids = list(recipients)
    per_wave = TOTAL // WAVES
    waves = [ids[w * per_wave:(w + 1) * per_wave if w < WAVES - 1 else TOTAL] for w in range(WAVES)]
    delivered = 0  # deliveries (a message to two mailboxes counts twice), as the progress counts do

    def deliver(wave: list[str]) -> int:
        nonlocal delivered
        by_box: dict[str, list[bytes]] = collections.defaultdict(list)
        for mid in wave:
            to = ", ".join(box.email for box in recipients[mid])
            raw = message(f"crash {mid.split('-')[2]}", to=to, message_id=f"<{mid}>")
            for box in recipients[mid]:
                by_box[box.email].append(raw)
        for email, raws in by_box.items():
            dovecot.deliver_many(email, raws)
        added = sum(len(raws) for raws in by_box.values())
        delivered += added
        return added

    org_ids = [o.id for o in orgs]

    async def ingested() -> int:
        return await ingested_count(pool, org_ids)

    async def decided() -> int:
        return await decided_count(pool, org_ids)

    env = service_env(settings, CONDUIT_INGEST_REFRESH_SECONDS="0.5", CONDUIT_INGEST_LEASE_TTL_SECONDS="4")
    ingest = ServiceProcess("ingest", env, tmp_path / "ingest.log")
    evaluate = ServiceProcess("evaluate", env, tmp_path / "evaluate.log")
    started = time.monotonic()
    deliver(waves[0])
    next_wave = 1
    await ingest.start()
    await evaluate.start()
    first = rng.choice(["ingest", "evaluate"])
    plan = [first if k % 2 == 0 else ("evaluate" if first == "ingest" else "ingest") for k in range(2 * KILLS_EACH)]
    kills: list[str] = []
    try:
        for kind in plan:
            wave = deliver(waves[next_wave])  # fresh mail, so the kill lands in the middle of work
            next_wave += 1
            proc, progress = (ingest, ingested) if kind == "ingest" else (evaluate, decided)
            # A random point in the work still to do (for ingest: inside the newest wave, unless behind).
            now = await progress()
            low = max(now, delivered - wave) if kind == "ingest" else now
            target = min(delivered, low + max(1, int((delivered - low) * rng.uniform(0.05, 0.7))))
            await eventually(lambda progress=progress, target=target: _at_least(progress, target, ingest, evaluate),
                             timeout=120, interval=0.005, what=f"{kind} progress to {target} before its kill {proc.kills + 1}")
            later = rng.random() < 0.5
            if later:
                await asyncio.sleep(rng.uniform(0, JITTER[kind]))  # see JITTER
            await proc.kill()
            kills.append(f"{kind}@{await progress()}/{delivered}{'+' if later else ''}")
            await proc.start()
        while next_wave < WAVES:
            deliver(waves[next_wave])
            next_wave += 1
        assert delivered == deliveries
        await eventually(lambda: _at_least(decided, deliveries, ingest, evaluate), timeout=240, interval=0.2,
                         what="a decision for every delivery")
        await eventually(lambda: _at_least(lambda: activity_count(pool, org_ids), TOTAL), timeout=30,
                         what="an activity for every message")
        for proc in (ingest, evaluate):  # a process restarted just now may still be starting up
            await eventually(proc.ready, timeout=60, interval=0.1, what=f"{proc.service} ready before SIGTERM")
    except BaseException:
        print(f"\nseed {seed}; kills so far {kills}\n--- ingest log\n{ingest.tail()}\n--- evaluate log\n{evaluate.tail()}")
        raise
    finally:
        statuses = {}
        for proc in (ingest, evaluate):
            if proc.alive():
                statuses[proc.service] = await proc.stop()
    elapsed = time.monotonic() - started
    assert statuses == {"ingest": 0, "evaluate": 0}, f"clean stops after SIGTERM: {statuses}"
    assert ingest.kills >= KILLS_EACH and evaluate.kills >= KILLS_EACH

    async with pool.acquire() as conn:
        activities = await conn.fetch(
            """SELECT a.id, a.organization_id, a.message_id,
                      array_agg(am.mailbox_id) FILTER (WHERE am.mailbox_id IS NOT NULL) AS mailboxes
               FROM email_activity a LEFT JOIN email_activity_mailbox am ON am.activity_id = a.id
               WHERE a.organization_id = ANY($1::uuid[]) GROUP BY a.id""", org_ids)
        doubled = await conn.fetch(
            """SELECT organization_id, message_id, count(*) AS n FROM email_activity WHERE organization_id = ANY($1::uuid[])
               GROUP BY organization_id, message_id HAVING count(*) > 1""", org_ids)
        decisions = await conn.fetch(
            """SELECT organization_id, mailbox_id, message_id, tracked, reason, activity_id FROM email_decision
               WHERE organization_id = ANY($1::uuid[])""", org_ids)
        ingested_rows = await conn.fetch(
            """SELECT im.mailbox_id, im.message_key FROM ingested_message im JOIN mailbox m ON m.id = im.mailbox_id
               WHERE m.organization_id = ANY($1::uuid[])""", org_ids)

    # Activities: one per message and organization, counted per organization and by Message-ID.
    assert not doubled, f"{len(doubled)} Message-IDs have more than one activity in their organization"
    activity_of: dict[tuple[uuid.UUID, str], asyncpg.Record] = {}
    for o in orgs:
        mine = {a["message_id"]: a for a in activities if a["organization_id"] == o.id}
        want = expected_activities[o.id]
        assert len(mine) == len(want), f"{len(mine)} activities for {len(want)} messages in one organization"
        missing = set(want) - set(mine)
        assert not missing, f"{len(missing)} messages lost, e.g. {sorted(missing)[:3]}"
        assert set(mine) == set(want), "no activity for a message that was not delivered"
        wrong = [m for m, a in mine.items() if sorted(a["mailboxes"] or []) != sorted(want[m])]
        assert not wrong, f"{len(wrong)} activities not linked to exactly the mailboxes they came through"
        activity_of.update({(o.id, m): a for m, a in mine.items()})
    assert len(activities) == sum(len(w) for w in expected_activities.values())
    assert len({a["message_id"] for a in activities}) == TOTAL

    # Decisions: every email_received decided once, tracked, on the activity of its organization.
    pairs = collections.Counter((d["mailbox_id"], d["message_id"]) for d in decisions)
    assert len(decisions) == deliveries and max(pairs.values()) == 1
    assert set(pairs) == expected_decisions
    untracked = [d for d in decisions if not d["tracked"]]
    assert not untracked, f"{len(untracked)} not tracked, e.g. {dict(untracked[0])}"
    assert all(d["activity_id"] == activity_of[(d["organization_id"], d["message_id"])]["id"] for d in decisions)

    # Ingest's own bookkeeping: each delivery ingested once, through its own mailbox.
    assert collections.Counter((r["mailbox_id"], r["message_key"]) for r in ingested_rows) == collections.Counter(expected_decisions)

    published = await _published(settings)
    assert set(published) == set(recipients), "every message was announced on email.received"

    problems = ingest.problems() + evaluate.problems()
    assert not problems, "internal errors logged:\n" + "\n".join(problems[:20])
    print(f"\nseed {seed}; kills at {kills} (progress/delivered, + for a delayed kill); {TOTAL} messages ({deliveries} deliveries) in {elapsed:.0f} s "
          f"({ingest.starts} ingest and {evaluate.starts} evaluate starts); email.received carried "
          f"{sum(published.values())} events ({sum(published.values()) - deliveries} published again after a kill)")


async def _published(settings: Settings) -> collections.Counter:
    """Every event on this test's `email.received`, counted by Message-ID: read until each of the
    test's messages was seen and a further second brings nothing.  (Not from the partitions' end
    offsets: Tansu answers ListOffsets with the last record batch's base offset + 1.)"""
    topic = topic_name(settings, EMAIL_RECEIVED.name)
    consumer = AIOKafkaConsumer(topic, **client_options(settings), group_id=f"count-{uuid.uuid4().hex[:8]}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    seen: collections.Counter = collections.Counter()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            if not batches and len(seen) >= TOTAL:  # every message seen, and nothing more comes
                break
            for records in batches.values():
                for record in records:
                    seen[json.loads(record.value)["data"]["message_id"]] += 1
    finally:
        await consumer.stop()
    return seen
