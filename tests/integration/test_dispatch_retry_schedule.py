"""Dispatch's retry schedule, read from the send ledger between attempts: after the n-th temporary
failure a request waits min(cap, base * 2^(n-1)) times a jitter in [0.5, 1] (``DispatchService._retry``).

Each of two requests meets six 451 replies in a row from its own aiosmtpd capture server, then is
sent.  After each failure the row is back in `pending_send` with ``attempts`` = n and
``next_attempt_at``; the delay it chose is ``next_attempt_at - updated_at`` (both written by the
statement that records the failure, ``updated_at`` being its transaction's start, a moment after
the delay was drawn: the delay read is never longer than the one chosen).  With base 0.25 s and cap
2 s the nominal delays are 0.25, 0.5, 1, 2, 2, 2 s: each range [nominal/2, nominal] touches the next
only at its edge, so a constant or linear delay falls outside them, a missing cap gives 4 and 8 s,
and without jitter every delay sits at its nominal value.

Against a running dispatch service, the broker, PostgreSQL and aiosmtpd."""
from __future__ import annotations

import asyncio
import time

import asyncpg

from conduit.peers.smtp import CaptureSmtpServer
from shared.kafka import Publisher
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.dispatch import dispatch_running, outbound, publish, sending_mailbox

BASE, CAP = 0.25, 2.0
FAILURES = 6
# Attempt n's nominal delay.
NOMINAL = {n: min(CAP, BASE * 2 ** (n - 1)) for n in range(1, FAILURES + 1)}
# The delay read may fall short of the one chosen by the moments between drawing it and the
# transaction that records it; never more (both clocks are this machine's).
SLACK = 0.1
DEADLINE = 60.0


async def _schedule(pool: asyncpg.Pool, org, key: str) -> tuple[dict[int, float], asyncpg.Record]:
    """The delay chosen after each failed attempt (attempt number -> seconds), read by watching the
    request's ledger row until it is sent; and the final row."""
    delays: dict[int, float] = {}
    deadline = time.monotonic() + DEADLINE
    while True:
        async with pool.acquire() as conn:
            row = await conn.fetchrow(
                """SELECT status, attempts, smtp_code, reason,
                          extract(epoch FROM next_attempt_at - updated_at)::float8 AS delay
                   FROM outbound_email WHERE organization_id = $1 AND idempotency_key = $2""", org.id, key)
        if row is not None and row["status"] == "pending_send" and row["attempts"] > 0:
            assert (row["smtp_code"], row["reason"]) == (451, "smtp_temporary"), dict(row)
            delays.setdefault(row["attempts"], row["delay"])
        if row is not None and row["status"] in ("sent", "failed"):
            return delays, row
        assert time.monotonic() < deadline, f"not sent within {DEADLINE:.0f} s; last: {row and dict(row)}"
        await asyncio.sleep(0.01)  # poll interval of a deadline-bounded wait


async def test_temporary_failures_back_off_exponentially_with_jitter_up_to_the_cap(
        settings: Settings, registry: Registry, org, publisher: Publisher, pool: asyncpg.Pool, tmp_path) -> None:
    with CaptureSmtpServer(tmp_path / "a") as first, CaptureSmtpServer(tmp_path / "b") as second:
        events = []
        for server in (first, second):
            server.fail_next(FAILURES, "451")
            sender = await sending_mailbox(registry, org, host="127.0.0.1", port=server.port)
            events.append(outbound(org, mailbox_id=sender.mailbox_id))
        async with dispatch_running(settings, retry_base_seconds=BASE, retry_cap_seconds=CAP, poll_seconds=0.05):
            await publish(publisher, *events)
            watched = await asyncio.gather(*(_schedule(pool, org, e.data.idempotency_key) for e in events))
        assert [len(s.messages()) for s in (first, second)] == [1, 1]

    ratios = []
    for delays, final in watched:
        assert (final["status"], final["attempts"]) == ("sent", FAILURES + 1), dict(final)
        print("delays chosen:", {n: round(d, 3) for n, d in sorted(delays.items())})
        assert sorted(delays) == list(range(1, FAILURES + 1)), "a retry was not seen in pending_send"
        for n, delay in delays.items():
            assert NOMINAL[n] / 2 - SLACK <= delay <= NOMINAL[n] + 0.01, (n, delay, NOMINAL[n])
        ratios += [delays[n] / NOMINAL[n] for n in delays if n > 1]
    # Jitter: ten draws from [0.5, 1] all within 0.1 of each other happen once in ~200,000 runs;
    # without jitter they all sit within a few hundredths of 1.
    assert max(ratios) - min(ratios) > 0.1, ratios
