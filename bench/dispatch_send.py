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

    .venv/bin/python bench/dispatch_send.py [--messages 10000] [--rate 200] [--seconds 15]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


async def throughput(settings: Settings, count: int, sink_port: int) -> tuple[float, float]:
    registry, org_id, mailbox_id, pool = await setup(settings, sink_port)
    publisher = Publisher(settings, client_id="bench")
    await publisher.start()
    for start in range(0, count, 2000):
        await publisher.publish_many(("email.outbound", request(org_id, mailbox_id, n), str(n))
                                     for n in range(start, min(count, start + 2000)))
    await publisher.stop()
    began = time.perf_counter()
    service = DispatchService(settings, DispatchSettings(), group_id=f"bench-{uuid.uuid4().hex[:6]}")
    await run_service(service, burst=True)
    wall = time.perf_counter() - began
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT count(*) FILTER (WHERE status = 'sent') AS sent, extract(epoch FROM max(sent_at) - min(created_at)) AS span
               FROM outbound_email WHERE organization_id = $1""", org_id)
    await pool.close()
    if row["sent"] != count:
        sys.exit(f"only {row['sent']} of {count} sent")
    return count / float(row["span"]), count / wall


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
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="conduit-bench-"))
    state.chmod(0o755)

    async def peers_and_runs() -> None:
        broker = EmbeddedBroker(state / "tansu.log")
        await broker.start()
        try:
            base = Settings(CONDUIT_STATE_DIR=str(state), KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers, CONDUIT_HEALTH_PORT=0)
            embedded_database_url(base)
            with SmtpSink() as sink:
                settings = base.model_copy(update={"topic_prefix": f"b{uuid.uuid4().hex[:6]}."})
                await ensure_topics(settings)
                ledger_rate, wall_rate = await throughput(settings, args.messages, sink.port)
                start = time.perf_counter()
                await aiosmtplib_reused(sink.port, args.messages, 10, make_message())
                baseline = args.messages / (time.perf_counter() - start)
                source = await asyncio.to_thread(smtp_source, sink.port, args.messages, 10)
                print(f"\nthroughput, {args.messages} requests of ~2 KB, email.outbound -> accepted at smtp-sink")
                print(f"  dispatch (first request in the ledger -> last accepted): {ledger_rate:8.0f} msg/s")
                print(f"  dispatch (whole burst run, incl. group join and start):  {wall_rate:8.0f} msg/s")
                print(f"  aiosmtplib sendmail loop, 10 reused connections:         {baseline:8.0f} msg/s")
                print(f"  Postfix smtp-source -s 10 -l 2000:                       {source:8.0f} msg/s")
                print(f"  ratio dispatch / aiosmtplib:  {ledger_rate / baseline:5.2f}x  (target >= 2.4x)")
                print(f"  ratio dispatch / smtp-source: {ledger_rate / source:5.2f}x  (target >= 0.25x)")
                if not args.skip_latency:
                    settings = base.model_copy(update={"topic_prefix": f"b{uuid.uuid4().hex[:6]}."})
                    await ensure_topics(settings)
                    samples = await latency(settings, args.rate, args.seconds, sink.port)
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
