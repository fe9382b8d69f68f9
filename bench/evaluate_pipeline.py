"""Benchmark: the evaluate service end to end, `email.received` on the broker -> activities committed.

Run:  .venv/bin/python bench/evaluate_pipeline.py [--messages 10000] [--repeat 2]

One run starts its own peers: an embedded PostgreSQL (fsync and synchronous commit on, as
shipped) and a Tansu broker.  An organization gets 20 users (one mailbox each, tracking "all",
incoming enabled) and CRM contacts for a third of the senders.  ``--messages`` realistic ~7 KB
messages (bench/evaluate_parse.py's generator: trace and DKIM headers, text+html, attachments,
replies, tracking tokens, RFC 2047) are stored and announced by ingest's own code
(``publish_pulled``: raw storage, then `email.received` keyed by mailbox), then
``EvaluateService`` runs in burst mode: consume, load raw, parse, look up, run the rule chains,
one transaction per batch for activities + mailbox links + decisions + outbox, then the offset
commit.

The rate is messages over the time from the first batch handed to the handler to the burst run's
end (last offsets committed); the whole run including start-up and the consumer group join is
printed too.  Each run is checked: one activity and one decision per message, the group's
committed offsets cover every event.  Measured in the same run: a plain
``email.message_from_bytes(raw, policy=email.policy.default)`` loop over the same messages.
Best of ``--repeat`` (fresh organization and topic prefix each).  ``--profile FILE`` writes
cProfile stats of one extra run.  Everything is removed at the end.

``--processes 1,2`` measures evaluate as ops scale it instead: N processes of
``python -m conduit run evaluate --burst`` (the bench's DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS,
CONDUIT_TOPIC_PREFIX and CONDUIT_STATE_DIR in their environment; the default consumer group,
under the run's fresh topic prefix) for each N listed, interleaved over ``--repeat`` rounds.  The
rate is the decisions committed from the first committed decision to the last, polled in the
database every ~10 ms, so start-up and the group join (several seconds for 2 members on Tansu)
are left out.  Each run is checked as above, and every process must end by itself (burst).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import email
import email.policy
import math
import os
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu import CpuSampler, report
from bench.workdir import bench_workdir
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.evaluate_parse import make_messages
from conduit.broker import EmbeddedBroker
from services.evaluate.service import GROUP, EvaluateService
from services.ingest.publishing import Mailbox, Pulled, publish_pulled
from shared.consumer import Delivery, Rejection
from shared.crypto import load_cipher
from shared.db.migrate import migrate
from shared.db.pool import create_pool, database_url, embedded_database_url
from shared.kafka import (
    Publisher,
    client_options,
    ensure_topics,
    topic_name,
)
from shared.lifecycle import run_service
from shared.mime import from_address
from shared.registry.service import ProfileInput, Registry
from shared.settings import Settings


class TimedEvaluate(EvaluateService):
    """The real service; it only notes when the first batch reached the handler and when work ended."""

    first: float | None = None
    ended: float | None = None
    cpu_first: float | None = None
    cpu_ended: float | None = None
    first_wall = ended_wall = 0.0   # the window in epoch seconds, for the machine's CPU in it
    rejected = 0

    async def prepare(self, deliveries: Sequence[Delivery]):  # the first step of every batch
        if self.first is None:
            self.first, self.cpu_first, self.first_wall = time.perf_counter(), time.process_time(), time.time()
        return await super().prepare(deliveries)

    async def finish(self, prepared) -> Sequence[Rejection]:
        rejections = await super().finish(prepared)
        self.rejected += len(rejections)
        return rejections

    async def work(self, stopping: asyncio.Event, *, burst: bool) -> None:
        await super().work(stopping, burst=burst)
        self.ended, self.cpu_ended, self.ended_wall = time.perf_counter(), time.process_time(), time.time()


async def prepare(base: Settings, pool, messages: list[bytes], owners: list[str]) -> tuple[Settings, uuid.UUID]:
    """A fresh organization and topic prefix, its mailboxes and contacts, and the messages announced."""
    settings = base.model_copy(update={"topic_prefix": f"b{uuid.uuid4().hex[:6]}."})
    await ensure_topics(settings)
    registry = Registry(pool, load_cipher(base), producer="bench")
    org = await registry.add_organization(f"bench-{uuid.uuid4().hex[:8]}")
    await registry.add_profile(org, ProfileInput(name="imap", server_type="imap", incoming_host="127.0.0.1",
                                                 incoming_port=1, incoming_tls="none", outgoing_port=25,
                                                 outgoing_tls="none"), make_default=True)
    boxes: dict[str, Mailbox] = {}
    for i, owner in enumerate(owners):
        await registry.add_user(org, f"Owner {i}", owner)
        await registry.update_mailbox(org, owner, email_approved=True, tracking="all")
        box = await registry.mailbox(org, owner)
        await registry.record_test(box.id, "incoming", True, "ok")
        boxes[owner] = Mailbox(box.id, org.id, False)
    senders = sorted({a for a in (from_address(m) for m in messages) if a})
    for n, address in enumerate(senders):
        if n % 3 == 0:
            await registry.add_record(org, "contact", f"Contact {n}", address)
    by_box: dict[str, list[Pulled]] = defaultdict(list)
    for uid, raw in enumerate(messages, start=1):
        head = raw[: raw.find(b"\r\n\r\n")].decode("utf-8", "replace")
        owner = next((o for o in owners if f"To: {o}" in head), owners[0])
        by_box[owner].append(Pulled(raw, "INBOX", uid))
    publisher = Publisher(settings, client_id="bench-ingest")
    await publisher.start()
    try:
        for owner, pulled in by_box.items():
            for i in range(0, len(pulled), 500):
                await publish_pulled(pool, publisher, boxes[owner], "imap", pulled[i:i + 500])
    finally:
        await publisher.stop()
    return settings, org.id


async def committed_offsets(settings: Settings, group: str = GROUP) -> dict[int, int]:
    """The group's committed offset of each partition of `email.received`."""
    name = topic_name(settings, "email.received")
    consumer = AIOKafkaConsumer(**client_options(settings), group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        partitions: set[int] = set()
        for _ in range(50):   # a consumer without a subscription may not know the topic yet
            await consumer.topics()   # fetches every topic's metadata
            partitions = consumer.partitions_for_topic(name) or set()
            if partitions:
                break
            await asyncio.sleep(0.1)
        return {p: await consumer.committed(TopicPartition(name, p)) or 0 for p in sorted(partitions)}
    finally:
        await consumer.stop()


async def one_run(base: Settings, pool, messages: list[bytes], owners: list[str],
                  profile: Path | None = None) -> dict[str, float]:
    settings, org_id = await prepare(base, pool, messages, owners)
    service = TimedEvaluate(settings)
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    with CpuSampler() as sampler:
        await run_service(service, burst=True)
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    whole = time.perf_counter() - started
    n = len(messages)
    async with pool.acquire() as conn:
        activities = await conn.fetchval("SELECT count(*) FROM email_activity WHERE organization_id = $1", org_id)
        decisions = await conn.fetchval("SELECT count(*) FROM email_decision WHERE organization_id = $1", org_id)
        tracked = await conn.fetchval("SELECT count(*) FROM email_decision WHERE organization_id = $1 AND tracked", org_id)
    offsets = sum((await committed_offsets(settings)).values())
    if decisions != n or activities != tracked or offsets != n or service.rejected:
        raise SystemExit(f"run incomplete: {decisions} decisions, {activities} activities ({tracked} tracked), "
                         f"{offsets} offsets committed, {service.rejected} rejected; expected {n}")
    assert service.first is not None and service.ended is not None
    return {"window": service.ended - service.first, "whole": whole, "activities": activities,
            "cpu": service.cpu_ended - service.cpu_first,
            "machine": sampler.window(service.first_wall, service.ended_wall)}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a running process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def processes_run(base: Settings, pool, messages: list[bytes], owners: list[str], processes: int,
                        logs: Path) -> dict[str, float]:
    """``processes`` evaluate processes in one consumer group, as ops would run them."""
    settings, org_id = await prepare(base, pool, messages, owners)
    # The default group, as deployed; the run's fresh topic prefix is also its group's prefix.
    env = {**os.environ, "DATABASE_URL": database_url(base), "KAFKA_BOOTSTRAP_SERVERS": base.kafka_bootstrap_servers,
           "CONDUIT_TOPIC_PREFIX": settings.topic_prefix, "CONDUIT_STATE_DIR": str(base.state_dir),
           "CONDUIT_HEALTH_PORT": "0", "CONDUIT_LOG_LEVEL": "WARNING"}
    n = len(messages)
    procs = []
    for i in range(processes):
        fd = os.open(logs / f"evaluate-{settings.topic_prefix}{i}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "conduit", "run", "evaluate", "--burst", cwd=ROOT, env=env,
                stdout=fd, stderr=asyncio.subprocess.STDOUT))
        finally:
            os.close(fd)
    started = time.perf_counter()
    first: tuple[float, int, list[float]] | None = None
    last: tuple[float, list[float]] | None = None
    cpu = [0.0] * processes          # the last reading of each process (an ended one keeps its last)
    progress = (0.0, 0)              # when the count last grew, and to what
    pause = 0.0                      # the longest time without a new decision inside the window
    first_done: tuple[float, int] | tuple[()] = ()
    try:
        async with pool.acquire() as conn:
            count_sql = "SELECT count(*) FROM email_decision WHERE organization_id = $1"
            deadline = started + 600
            while True:
                count = await conn.fetchval(count_sql, org_id)
                now = time.perf_counter()
                cpu = [old if math.isnan(c) else c for c, old in zip((_cpu_seconds(p.pid) for p in procs), cpu)]
                if count > progress[1]:
                    if first is not None:
                        pause = max(pause, now - progress[0])
                    progress = (now, count)
                if first is None and count:
                    first = (now, count, list(cpu))
                if first is not None and not first_done and any(p.returncode is not None for p in procs):
                    first_done = (now - first[0], count - first[1])   # one process's partitions finished
                if count >= n:
                    last = (now, list(cpu))
                    break
                if all(p.returncode is not None for p in procs) or now > deadline:
                    raise SystemExit(f"evaluate processes ended or timed out with {count} of {n} decided "
                                     f"(logs in {logs})")
                await asyncio.sleep(0.01)
        codes = [await asyncio.wait_for(p.wait(), 120) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    ended = time.perf_counter()
    if any(codes):
        raise SystemExit(f"evaluate processes exited with {codes} (logs in {logs})")
    async with pool.acquire() as conn:
        activities = await conn.fetchval("SELECT count(*) FROM email_activity WHERE organization_id = $1", org_id)
        decisions = await conn.fetchval("SELECT count(*) FROM email_decision WHERE organization_id = $1", org_id)
        tracked = await conn.fetchval("SELECT count(*) FROM email_decision WHERE organization_id = $1 AND tracked", org_id)
        distinct = await conn.fetchval(
            "SELECT count(DISTINCT (mailbox_id, message_id)) FROM email_decision WHERE organization_id = $1", org_id)
    offsets = await committed_offsets(settings)
    if decisions != n or distinct != n or activities != tracked or sum(offsets.values()) != n:
        raise SystemExit(f"run incomplete: {decisions} decisions ({distinct} distinct), {activities} activities "
                         f"({tracked} tracked), {sum(offsets.values())} offsets committed; expected {n}")
    assert first is not None and last is not None
    return {"window": last[0] - first[0], "in_window": n - first[1], "whole": ended - started,
            "first_after": first[0] - started, "activities": activities,
            "cpu": sum(b - a for a, b in zip(first[2], last[1])), "pause": pause, "first_done": first_done, "split": "/".join(str(v) for v in offsets.values())}


def stdlib_loop(messages: list[bytes]) -> float:
    started = time.perf_counter()
    for raw in messages:
        email.message_from_bytes(raw, policy=email.policy.default)
    return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile stats of one extra run")
    parser.add_argument("--processes", default=None,
                        help="comma-separated process counts (e.g. 1,2): run evaluate as that many processes")
    args = parser.parse_args()
    counts = [int(c) for c in args.processes.split(",")] if args.processes else []

    messages, owners = make_messages(args.messages)
    workdir = bench_workdir()
    broker = EmbeddedBroker(workdir / "tansu.log")
    runs: list[dict[str, float]] = []
    stdlib: list[float] = []
    by_count: dict[int, list[dict[str, float]]] = defaultdict(list)
    try:
        await broker.start()
        base = Settings(CONDUIT_STATE_DIR=str(workdir / "state"), KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
                        CONDUIT_HEALTH_PORT=0)
        embedded_database_url(base)
        pool = await create_pool(base, max_size=4)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            for _ in range(args.repeat):   # interleaved with the peer, so load elsewhere hits both alike
                if counts:
                    for count in counts:
                        by_count[count].append(await processes_run(base, pool, messages, owners, count, workdir))
                    continue
                runs.append(await one_run(base, pool, messages, owners))
                stdlib.append(stdlib_loop(messages))
            if args.profile:
                await one_run(base, pool, messages, owners, args.profile)
        finally:
            await pool.close()
    finally:
        await broker.stop()

    n = len(messages)
    size = sum(map(len, messages)) / n
    if counts:
        report_processes(n, size, args.repeat, by_count)
        return
    windows = [n / r["window"] for r in runs]
    wholes = [n / r["whole"] for r in runs]
    peers = [n / s for s in stdlib]
    print(f"\nevaluate pipeline: {n} messages (mean {size / 1024:.1f} KB), email.received -> activities + decisions "
          f"committed + offsets committed; {args.repeat} runs, in order")
    print("  EvaluateService (first batch -> last offset committed)  " + "  ".join(f"{v:8,.0f}" for v in windows) + " msg/s")
    print("  EvaluateService whole burst run (start, group join)    " + "  ".join(f"{v:8,.0f}" for v in wholes) + " msg/s")
    print("  CPU of this process in the window                      " + "  ".join(f"{r['cpu']:8.2f}" for r in runs) + " s")
    for r in runs:
        busy, programs = r["machine"]
        print(report(busy, r["window"], programs, n))
    print(f"  activities per run: {', '.join(str(int(r['activities'])) for r in runs)} of {n} messages")
    print("  email.message_from_bytes(policy=default) loop          " + "  ".join(f"{v:8,.0f}" for v in peers) + " msg/s")
    print(f"\n  evaluate: best {max(windows):,.0f} msg/s, worst {min(windows):,.0f} msg/s   (target >= 3,000)")
    print("  ratio evaluate / stdlib policy.default, same round: "
          + ", ".join(f"{(n / r['window']) / (n / s):.2f}x" for r, s in zip(runs, stdlib)) + "   (target >= 2x)")
    print("  load average at the end (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))


def report_processes(n: int, size: float, repeat: int, by_count: dict[int, list[dict[str, float]]]) -> None:
    print(f"\nevaluate pipeline, separate processes: {n} messages (mean {size / 1024:.1f} KB), email.received -> "
          f"activities + decisions committed + offsets committed; {repeat} rounds, in order")
    for count, runs in sorted(by_count.items()):
        rates = [r["in_window"] / r["window"] for r in runs]
        print(f"  {count} process(es), first decision committed -> last   " + "  ".join(f"{v:8,.0f}" for v in rates) + " msg/s")
        print("      whole run incl. start-up and group join          " + "  ".join(f"{n / r['whole']:8,.0f}" for r in runs) + " msg/s")
        print("      first decision committed after                   " + "  ".join(f"{r['first_after']:8.1f}" for r in runs) + " s")
        print("      CPU of the processes in the window               " + "  ".join(f"{r['cpu']:8.2f}" for r in runs) + " s")
        print("      longest pause between decisions in the window    " + "  ".join(f"{r['pause']:8.2f}" for r in runs) + " s")
        if count > 1:
            print("      while all processes ran (first one done after)   " + "  ".join(
                f"{r['first_done'][1] / r['first_done'][0]:8,.0f}" if r["first_done"] and r["first_done"][0] > 0 else "       -" for r in runs)
                + " msg/s")
        print("      events per partition                             " + "  ".join(str(r["split"]) for r in runs))
        print(f"      best {max(rates):,.0f} msg/s, worst {min(rates):,.0f} msg/s   (target >= 3,000)")
    print("  load average at the end (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    asyncio.run(main())
