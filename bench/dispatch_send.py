"""Benchmark: dispatch end to end, from `email.outbound` to accepted at Postfix smtp-sink.

Starts its own peers in this run: an embedded PostgreSQL, a Tansu broker and smtp-sink, and sets
up an organization with one user mailbox on an SMTP profile (10 concurrent connections, tracking
tokens on, outgoing activities recorded).  Two measurements:

1. throughput: N requests of 2 KB published first, then DispatchService runs in burst mode; the
   rate is N over the time from the first request entering the ledger to the last one accepted
   (``sent_at``), and also over the whole run including the consumer's group join.  Measured in
   the same run and printed as ratios: a bare aiosmtplib ``sendmail`` loop over 10 reused
   connections, and Postfix ``smtp-source -s 10 -l 2000`` into the same sink.
2. latency: requests published at a steady rate (200/s) to a running service; latency is the
   request event's time to ``sent_at`` (the sink's 250 reply was recorded), p50 and p99.

With ``--processes N`` the throughput run is repeated with dispatch as separate processes in one
consumer group, as ops scale it: the requests are published first, then 1 and then N ``python -m
conduit run dispatch --burst`` processes are started (sharing the run's database, broker, topic
prefix, state folder and a ``CONDUIT_DISPATCH_GROUP_ID`` of their own), ``--rounds`` times; the rate
is measured from the first request in the ledger (after the group join) to the last accepted, and
also from the first one accepted.  Each process holds its own SMTP pool, so N processes may open N
times the profile's connections.

Every dispatch run is checked at the sink, which appends each transaction to a dump file on tmpfs
(on this machine's disk the dumping sink itself topped out below 2,000 msg/s): every request's
Message-ID (from the ledger) arrived exactly once.  smtp-source is measured into that same sink (the
issue's comparison: the sink's work per message is the same for both) and into a second sink that
does not dump (a faster peer, so a stricter ratio); both ratios are printed.  aiosmtplib goes to the
second sink.

    .venv/bin/python bench/dispatch_send.py [--messages 10000] [--rate 200] [--seconds 15]
        [--processes N [--rounds R] [--timeline]] [--skip-latency] [--profile FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu import CpuSampler, report  # noqa: E402
from bench.workdir import bench_workdir  # noqa: E402
from bench.smtp_send import MESSAGE_SIZE, aiosmtplib_reused, make_message, smtp_source  # noqa: E402
from conduit.broker import EmbeddedBroker  # noqa: E402
from conduit.peers.smtp import SmtpSink  # noqa: E402
from services.dispatch.service import DispatchService  # noqa: E402
from services.dispatch.settings import DispatchSettings  # noqa: E402
from shared.crypto import load_cipher  # noqa: E402
from shared.db.migrate import migrate  # noqa: E402
from shared.db.pool import create_pool, embedded_database_url  # noqa: E402
from shared.events.envelope import Envelope, encode_event  # noqa: E402
from shared.events.payloads import EmailOutboundV1  # noqa: E402
from shared.kafka import Publisher, ensure_topics  # noqa: E402
from shared.lifecycle import run_service  # noqa: E402
from shared.registry.service import ProfileInput, Registry  # noqa: E402
from shared.settings import Settings  # noqa: E402

BODY = ("x" * 76 + "\n") * ((MESSAGE_SIZE - 400) // 77)  # ~2 KB on the wire with our headers


def request(org_id: uuid.UUID, mailbox_id: uuid.UUID, n: int) -> bytes:
    return encode_event(Envelope[EmailOutboundV1](
        type="email.outbound", schema_version=1, producer="bench", organization_id=org_id,
        data=EmailOutboundV1(idempotency_key=f"bench-{uuid.uuid4().hex}", mailbox_id=mailbox_id,
                             to=["sink@example.net"], subject=f"bench {n}", text=BODY)))


async def setup(settings: Settings, sink_port: int) -> tuple[Registry, uuid.UUID, uuid.UUID, object]:
    pool = await create_pool(settings, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    registry = Registry(pool, load_cipher(settings), producer="bench")
    org = await registry.add_organization(f"bench-{uuid.uuid4().hex[:8]}")
    await registry.add_profile(org, ProfileInput(name="sink", server_type="smtp", outgoing_host="127.0.0.1",
                                                 outgoing_port=sink_port, outgoing_tls="none",
                                                 use_same_settings_for_outgoing=False, max_concurrent_connections=10))
    email = f"bench-{uuid.uuid4().hex[:6]}@example.com"
    await registry.add_user(org, "Bench User", email)
    await registry.update_mailbox(org, email, email_approved=True)
    mailbox = await registry.mailbox(org, email)
    await registry.record_test(mailbox.id, "outgoing", True, "ok")
    return registry, org.id, mailbox.id, pool


MESSAGE_ID = re.compile(rb"^message-id:\s*<([^>\r\n]*)>", re.IGNORECASE | re.MULTILINE)


@dataclass
class Run:
    """One throughput run: rates in msg/s over the ledger's times, the whole run, and its cost."""

    processes: int  # 0: DispatchService in this process
    ledger_rate: float  # first request in the ledger -> last accepted
    sent_rate: float  # first accepted -> last accepted
    wall_rate: float  # the whole run, including start-up and the group join
    cpu: list[float]  # CPU seconds of each dispatch process (in-process: this process during the run)
    load: tuple[float, float]  # 1-minute load average before and after
    timeline: list[tuple[int, int, int]]  # (second from the first ledger row, rows written, accepted)
    machine: tuple[float, float, Counter[str]] | None = None  # the ledger window: seconds, CPU seconds, per program


async def publish_requests(settings: Settings, org_id: uuid.UUID, mailbox_id: uuid.UUID, count: int) -> None:
    publisher = Publisher(settings, client_id="bench")
    await publisher.start()
    for start in range(0, count, 2000):
        await publisher.publish_many(("email.outbound", request(org_id, mailbox_id, n), str(n))
                                     for n in range(start, min(count, start + 2000)))
    await publisher.stop()


async def check_at_sink(sink: SmtpSink, message_ids: list[str]) -> None:
    """Exit unless every Message-ID arrived at the sink exactly once."""
    expected = set(message_ids)
    deadline = time.monotonic() + 30
    while True:
        seen: dict[str, int] = {}
        for dump in sink.dumped_messages():
            match = MESSAGE_ID.search(dump)
            if match is not None and match.group(1).decode() in expected:
                key = match.group(1).decode()
                seen[key] = seen.get(key, 0) + 1
        if len(seen) == len(expected) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)  # poll interval of a deadline-bounded wait for the last dumps
    missing = len(expected) - len(seen)
    twice = sum(1 for n in seen.values() if n > 1)
    if missing or twice or len(expected) != len(message_ids):
        sys.exit(f"at the sink: {missing} of {len(expected)} requests missing, {twice} arrived more than once")
    sink.clear_dumps()


async def ledger_figures(pool: object, org_id: uuid.UUID, count: int) -> tuple[float, float, list[str], list, tuple[float, float]]:
    """(first request in the ledger -> last accepted, first accepted -> last accepted) in seconds,
    the Message-IDs, a per-second timeline and the window's (start, end) as epoch seconds; exits
    unless all ``count`` requests are sent."""
    async with pool.acquire() as conn:  # type: ignore[attr-defined]
        row = await conn.fetchrow(
            """SELECT count(*) FILTER (WHERE status = 'sent') AS sent,
                      extract(epoch FROM max(sent_at) - min(created_at)) AS span,
                      extract(epoch FROM max(sent_at) - min(sent_at)) AS sending,
                      extract(epoch FROM min(created_at)) AS t0, extract(epoch FROM max(sent_at)) AS t1
               FROM outbound_email WHERE organization_id = $1""", org_id)
        ids = [r["message_id"] for r in await conn.fetch(
            "SELECT message_id FROM outbound_email WHERE organization_id = $1", org_id)]
        timeline = [tuple(r) for r in await conn.fetch(
            """WITH t AS (SELECT min(created_at) AS t0 FROM outbound_email WHERE organization_id = $1),
                    s AS (SELECT generate_series(0, ceil(extract(epoch FROM max(o.sent_at) - t.t0))::int) AS second
                          FROM outbound_email o, t WHERE o.organization_id = $1 GROUP BY t.t0)
               SELECT s.second,
                      count(*) FILTER (WHERE floor(extract(epoch FROM o.created_at - t.t0)) = s.second),
                      count(*) FILTER (WHERE floor(extract(epoch FROM o.sent_at - t.t0)) = s.second)
               FROM s CROSS JOIN t JOIN outbound_email o ON o.organization_id = $1
               GROUP BY s.second ORDER BY s.second""", org_id)]
    if row["sent"] != count:
        sys.exit(f"only {row['sent']} of {count} sent")
    return float(row["span"]), float(row["sending"]), ids, timeline, (float(row["t0"]), float(row["t1"]))


async def throughput(settings: Settings, count: int, sink: SmtpSink, profile: str | None = None) -> Run:
    _registry, org_id, mailbox_id, pool = await setup(settings, sink.port)
    await publish_requests(settings, org_id, mailbox_id, count)
    sink.clear_dumps()
    load = os.getloadavg()[0]
    cpu_before = time.process_time()
    began = time.perf_counter()
    service = DispatchService(settings, DispatchSettings(), group_id=f"bench-{uuid.uuid4().hex[:6]}")
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    with CpuSampler() as sampler:
        await run_service(service, burst=True)
    wall = time.perf_counter() - began
    cpu = time.process_time() - cpu_before
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    span, sending, ids, timeline, (t0, t1) = await ledger_figures(pool, org_id, count)
    await pool.close()
    await check_at_sink(sink, ids)
    busy, programs = sampler.window(t0, t1)
    return Run(0, count / span, count / sending, count / wall, [cpu], (load, os.getloadavg()[0]), timeline,
               (t1 - t0, busy, programs))


async def throughput_processes(settings: Settings, database: str, count: int, sink: SmtpSink, processes: int) -> Run:
    """``processes`` dispatch processes in one consumer group drain ``count`` requests published first."""
    _registry, org_id, mailbox_id, pool = await setup(settings, sink.port)
    await publish_requests(settings, org_id, mailbox_id, count)
    sink.clear_dumps()
    env = {**os.environ, "DATABASE_URL": database, "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
           "CONDUIT_TOPIC_PREFIX": settings.topic_prefix, "CONDUIT_STATE_DIR": str(settings.state_dir),
           "CONDUIT_DISPATCH_GROUP_ID": f"bench-{uuid.uuid4().hex[:6]}", "CONDUIT_HEALTH_PORT": "0",
           "CONDUIT_LOG_LEVEL": "WARNING"}
    logs = [settings.state_dir / f"dispatch-{settings.topic_prefix}{i}.stderr" for i in range(processes)]
    load = os.getloadavg()[0]
    began = time.perf_counter()
    children = []
    for log_path in logs:
        with log_path.open("wb") as stderr:
            # A plain child, not asyncio's: os.wait4 below reaps it (asyncio's watcher would race it).
            children.append(subprocess.Popen(  # noqa: ASYNC220 - started once, before the timed work
                [sys.executable, "-m", "conduit", "run", "dispatch", "--burst"], cwd=ROOT,
                env=env, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr))
    # os.wait4 rather than Popen.wait: it also gives each process's CPU time.
    waits = [asyncio.ensure_future(asyncio.to_thread(os.wait4, child.pid, 0)) for child in children]
    _done, pending = await asyncio.wait(waits, timeout=600)
    for child, wait in zip(children, waits):
        if wait in pending:
            child.kill()
    results = await asyncio.gather(*waits)
    wall = time.perf_counter() - began
    failed = [(i, os.waitstatus_to_exitcode(status)) for i, (_, status, _) in enumerate(results)
              if os.waitstatus_to_exitcode(status) != 0 or waits[i] in pending]
    for i, log_path in enumerate(logs):
        text = log_path.read_text(errors="replace").strip()
        if text:
            print(f"  [process {i + 1} of {processes}, stderr, last lines]\n    "
                  + "\n    ".join(text.splitlines()[-20:]), file=sys.stderr)
    if failed:
        sys.exit(f"dispatch processes failed (index, exit code; -9 = killed after 600 s): {failed}")
    span, sending, ids, timeline, _ = await ledger_figures(pool, org_id, count)
    await pool.close()
    await check_at_sink(sink, ids)
    cpu = [usage.ru_utime + usage.ru_stime for _, _, usage in results]
    return Run(processes, count / span, count / sending, count / wall, cpu, (load, os.getloadavg()[0]), timeline)


async def latency(settings: Settings, rate: int, seconds: float, sink_port: int) -> list[float]:
    registry, org_id, mailbox_id, pool = await setup(settings, sink_port)
    stopping = asyncio.Event()
    service = DispatchService(settings, DispatchSettings(), group_id=f"bench-{uuid.uuid4().hex[:6]}")
    running = asyncio.create_task(run_service(service, stopping=stopping))
    publisher = Publisher(settings, client_id="bench")
    await publisher.start()
    # Warm up: the group join and the first SMTP sessions are not part of steady state.
    await publisher.publish_raw("email.outbound", request(org_id, mailbox_id, -1), "warm")
    while True:
        async with pool.acquire() as conn:
            if await conn.fetchval("SELECT count(*) FROM outbound_email WHERE organization_id = $1 AND status = 'sent'", org_id):
                break
        await asyncio.sleep(0.1)  # poll interval of a bounded warm-up wait
    total = int(rate * seconds)
    start = time.perf_counter()
    for n in range(total):
        await publisher.publish_raw("email.outbound", request(org_id, mailbox_id, n), str(n))
        delay = start + (n + 1) / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the load generator, not synchronisation
    await publisher.stop()
    deadline = time.monotonic() + 60
    async with pool.acquire() as conn:
        while await conn.fetchval("SELECT count(*) FROM outbound_email WHERE organization_id = $1 AND status = 'sent'", org_id) < total + 1:
            if time.monotonic() > deadline:
                sys.exit("the latency run did not finish")
            await asyncio.sleep(0.1)
        rows = await conn.fetch(
            """SELECT extract(epoch FROM sent_at - requested_at) AS s FROM outbound_email
               WHERE organization_id = $1 AND idempotency_key NOT IN (SELECT idempotency_key FROM outbound_email
                     WHERE organization_id = $1 ORDER BY created_at LIMIT 1)""", org_id)
    stopping.set()
    await running
    await pool.close()
    return sorted(float(r["s"]) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--processes", type=int, default=0,
                        help="also run 1 and N dispatch processes in one consumer group (subprocesses)")
    parser.add_argument("--rounds", type=int, default=1, help="with --processes: repeat the 1 and N runs")
    parser.add_argument("--profile", metavar="FILE", help="write cProfile stats of the in-process throughput run")
    parser.add_argument("--timeline", action="store_true",
                        help="with --processes: print each run's requests entering the ledger and accepted, per second")
    args = parser.parse_args()

    state = bench_workdir()

    async def peers_and_runs() -> None:
        broker = EmbeddedBroker(state / "tansu.log")
        await broker.start()
        try:
            base = Settings(CONDUIT_STATE_DIR=str(state), KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers, CONDUIT_HEALTH_PORT=0)
            database = embedded_database_url(base)
            # Dispatch sends to a sink that dumps every transaction (to count what arrived); the
            # baselines to one that does not.
            with SmtpSink(dump_file=bench_workdir(memory=True) / "sink" / "dump") as sink, SmtpSink() as plain:
                settings = base.model_copy(update={"topic_prefix": f"b{uuid.uuid4().hex[:6]}."})
                await ensure_topics(settings)
                run = await throughput(settings, args.messages, sink, args.profile)
                ledger_rate, wall_rate = run.ledger_rate, run.wall_rate
                runs: list[Run] = []
                for _ in range(args.rounds if args.processes else 0):
                    for processes in sorted({1, args.processes}):
                        settings = base.model_copy(update={"topic_prefix": f"b{uuid.uuid4().hex[:6]}."})
                        await ensure_topics(settings)
                        runs.append(await throughput_processes(settings, database, args.messages, sink, processes))
                start = time.perf_counter()
                await aiosmtplib_reused(plain.port, args.messages, 10, make_message())
                baseline = args.messages / (time.perf_counter() - start)
                source = await asyncio.to_thread(smtp_source, plain.port, args.messages, 10)
                sink.clear_dumps()
                source_same = await asyncio.to_thread(smtp_source, sink.port, args.messages, 10)
                sink.clear_dumps()
                print(f"\nthroughput, {args.messages} requests of ~2 KB, email.outbound -> accepted at smtp-sink "
                      f"(each request arrived exactly once)")
                print(f"  dispatch (first request in the ledger -> last accepted): {ledger_rate:8.0f} msg/s")
                print(f"  dispatch (whole burst run, incl. group join and start):  {wall_rate:8.0f} msg/s"
                      f"   (CPU {run.cpu[0]:.1f} s, load {run.load[0]:.2f} / {run.load[1]:.2f})")
                seconds, busy, programs = run.machine  # type: ignore[misc]
                print(report(busy, seconds, programs, args.messages, "request"))
                print(f"  aiosmtplib sendmail loop, 10 reused connections:         {baseline:8.0f} msg/s")
                print(f"  Postfix smtp-source -s 10 -l 2000, into dispatch's sink: {source_same:8.0f} msg/s")
                print(f"  the same into a sink that does not dump:                 {source:8.0f} msg/s")
                print(f"  ratio dispatch / aiosmtplib:  {ledger_rate / baseline:5.2f}x  (target >= 2.4x)")
                print(f"  ratio dispatch / smtp-source: {ledger_rate / source_same:5.2f}x into the same sink  (target >= 0.25x); "
                      f"{ledger_rate / source:5.2f}x against the sink that does not dump")
                if runs:
                    print(f"\n{'processes':>9}  {'ledger -> last':>14}  {'first -> last':>13}  {'whole run':>9}  "
                          f"{'CPU s per process':>17}  load before/after   (msg/s; target >= 2,000 from the ledger)")
                    for r in runs:
                        cpu = " + ".join(f"{c:.1f}" for c in r.cpu)
                        print(f"{r.processes:>9}  {r.ledger_rate:14.0f}  {r.sent_rate:13.0f}  {r.wall_rate:9.0f}  "
                              f"{cpu:>17}  {r.load[0]:.2f} / {r.load[1]:.2f}")
                    if args.timeline:
                        for r in runs:
                            print(f"  {r.processes} process(es), per second (written to the ledger / accepted): "
                                  + "  ".join(f"{w}/{a}" for _, w, a in r.timeline))
                    for processes in sorted({1, args.processes}):
                        rates = [r.ledger_rate for r in runs if r.processes == processes]
                        print(f"  {processes} process{'es' if processes > 1 else ''}, ledger -> last accepted: "
                              f"{min(rates):.0f}-{max(rates):.0f} msg/s over {len(rates)} run(s)")
                if not args.skip_latency:
                    settings = base.model_copy(update={"topic_prefix": f"b{uuid.uuid4().hex[:6]}."})
                    await ensure_topics(settings)
                    samples = await latency(settings, args.rate, args.seconds, plain.port)
                    p50 = statistics.median(samples)
                    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
                    print(f"\nlatency at {args.rate} requests/s for {args.seconds:.0f} s ({len(samples)} requests), "
                          f"publish -> accepted at smtp-sink")
                    print(f"  p50 {p50 * 1000:6.1f} ms (target < 100)   p99 {p99 * 1000:6.1f} ms (target < 500)   "
                          f"max {samples[-1] * 1000:6.1f} ms")
        finally:
            await broker.stop()

    asyncio.run(peers_and_runs())


if __name__ == "__main__":
    main()
