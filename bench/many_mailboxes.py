"""Benchmark: many mailboxes on one ingest replica: time to first full sync, CPU seconds, peak RSS.

Run:  .venv/bin/python bench/many_mailboxes.py [--mailboxes 2000] [--messages 10] [--connections 100]

One run starts its own peers (embedded PostgreSQL, Tansu, a private Dovecot with ``--mailboxes``
users, ``--messages`` messages of ~7 KB in each INBOX) and registers one user mailbox per Dovecot
user (approved, incoming enabled, tracking "all") on one IMAP profile allowing
``--connections`` concurrent connections.  Then one ingest replica runs as its own process
(`conduit run ingest`, as a pod runs it).  Reported:

- time to first full sync: process start -> every message of every mailbox recorded as ingested
  (raw stored, `email.received` acknowledged, folder state saved);
- the ingest process's CPU seconds (user + system, /proc) at that moment, and over the next
  ``--steady`` seconds of steady state (IDLE sessions and polling, nothing new arriving);
- its peak RSS (VmHWM).

Everything is stopped and removed at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workdir import bench_workdir
from pydantic import SecretStr

from bench.idle_latency import start_service, stop_service
from bench.imap_fetch import make_messages
from conduit.broker import EmbeddedBroker
from conduit.peers.dovecot import Dovecot
from shared.crypto import load_cipher
from shared.db.migrate import migrate
from shared.db.pool import create_pool, embedded_database_url
from shared.kafka import ensure_topics
from shared.registry.service import ProfileInput, Registry
from shared.settings import Settings

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS   # utime, stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=10, help="messages per INBOX")
    parser.add_argument("--connections", type=int, default=100, help="the profile's max concurrent connections")
    parser.add_argument("--steady", type=float, default=30.0, help="seconds of steady state measured after the sync")
    args = parser.parse_args()

    workdir = bench_workdir()
    broker = EmbeddedBroker(workdir / "tansu.log")
    ingest: subprocess.Popen[bytes] | None = None
    try:
        await broker.start()
        prefix = f"b{uuid.uuid4().hex[:6]}."
        base = Settings(CONDUIT_STATE_DIR=str(workdir / "state"), KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
                        CONDUIT_HEALTH_PORT=0, CONDUIT_TOPIC_PREFIX=prefix)
        dsn = embedded_database_url(base)
        await ensure_topics(base)
        pool = await create_pool(base, max_size=8)
        try:
            async with Dovecot(workdir / "dovecot") as dovecot:
                async with pool.acquire() as conn:
                    await migrate(conn)
                registry = Registry(pool, load_cipher(base), producer="bench")
                org = await registry.add_organization(f"bench-{uuid.uuid4().hex[:8]}")
                await registry.add_profile(org, ProfileInput(
                    name="dovecot", server_type="imap", incoming_host=dovecot.host, incoming_port=dovecot.imap_port,
                    incoming_tls="none", outgoing_port=25, outgoing_tls="none", min_polling_interval_seconds=60,
                    max_concurrent_connections=args.connections))
                template = make_messages(args.messages, 7000)
                users = [f"box{i:05d}@example.com" for i in range(args.mailboxes)]
                started = time.perf_counter()
                gate = asyncio.Semaphore(8)

                async def register(user: str) -> None:
                    password = f"pw-{user}"
                    dovecot.add_user(user, password)
                    # Each INBOX gets its own copies (own Message-IDs): no two mailboxes share a message.
                    tag = user.split("@")[0].encode()
                    dovecot.deliver_many(user, [m.replace(b"<bench-", b"<" + tag + b"-") for m in template])
                    async with gate:
                        await registry.add_user(org, f"User {user}", user)
                        await registry.set_credentials(org, user, user, SecretStr(password))
                        await registry.update_mailbox(org, user, email_approved=True, tracking="all")
                        box = await registry.mailbox(org, user)
                        await registry.record_test(box.id, "incoming", True, "ok")

                await asyncio.gather(*(register(u) for u in users))
                print(f"set-up: {args.mailboxes} mailboxes x {args.messages} messages in "
                      f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
                expected = args.mailboxes * args.messages

                env = {**os.environ, "DATABASE_URL": dsn, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                       "CONDUIT_STATE_DIR": str(workdir / "state"), "CONDUIT_TOPIC_PREFIX": prefix,
                       "CONDUIT_HEALTH_PORT": "0", "CONDUIT_LOG_LEVEL": "WARNING"}
                started = time.perf_counter()
                ingest = start_service("ingest", env, workdir)
                done = 0
                deadline = started + 1800
                while True:
                    async with pool.acquire() as conn:
                        done = await conn.fetchval("SELECT count(*) FROM ingested_message")
                    if done >= expected:
                        break
                    if ingest.poll() is not None or time.perf_counter() > deadline:
                        raise SystemExit(f"ingest stopped or timed out with {done} of {expected} ingested:\n"
                                         + (workdir / "ingest.log").read_text()[-3000:])
                    await asyncio.sleep(0.2)   # polling the database for completion, bounded by the deadline
                sync_seconds = time.perf_counter() - started
                cpu_sync = cpu_seconds(ingest.pid)
                rss_sync = peak_rss_mb(ingest.pid)
                await asyncio.sleep(args.steady)
                cpu_steady = cpu_seconds(ingest.pid) - cpu_sync
                rss_peak = peak_rss_mb(ingest.pid)
                async with pool.acquire() as conn:
                    states = await conn.fetchval("SELECT count(*) FROM imap_folder_state")
                    failing = await conn.fetchval("SELECT count(*) FROM mailbox WHERE incoming_error_count > 0")
                stop_service(ingest)
        finally:
            await pool.close()
    finally:
        if ingest is not None:
            stop_service(ingest)
        await broker.stop()

    print(f"\nmany mailboxes: {args.mailboxes} Dovecot users x {args.messages} messages of ~7 KB, one ingest replica, "
          f"profile limit {args.connections} connections")
    print(f"  time to first full sync: {sync_seconds:7.1f} s  ({expected / sync_seconds:,.0f} msg/s, "
          f"{args.mailboxes / sync_seconds:,.0f} mailboxes/s); folder states {states}, mailboxes failing {failing}")
    print(f"  ingest CPU until then:   {cpu_sync:7.1f} s    steady state: {cpu_steady:5.2f} s over {args.steady:.0f} s "
          f"({100 * cpu_steady / args.steady:.1f}% of a core)")
    print(f"  ingest peak RSS:         {rss_peak:7.0f} MB (at full sync {rss_sync:.0f} MB)")


if __name__ == "__main__":
    asyncio.run(main())
