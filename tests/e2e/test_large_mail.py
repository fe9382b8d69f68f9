"""Large mail in a bounded memory: a batch of messages with large attachments is not held whole.

An operator audit delivered 25 messages of ~20 MB: ingest and evaluate each peaked near 700 MB,
above the 512 Mi the Kubernetes manifests allow (an OOM kill before the batch commits, then the same
batch again).  Ingest now ends a batch at ``BATCH_BYTES`` of raw mail, and evaluate loads a batch of
more than ``max_batch_bytes`` a part at a time.  Measured here with tracemalloc (the Python heap's
peak) against real Dovecot, PostgreSQL and the broker, with the limits scaled down."""
from __future__ import annotations

import base64
import os
import tracemalloc

import pytest

from services.evaluate.service import EvaluateService
from services.evaluate.settings import EvaluateSettings
from services.ingest import imap_sync
from services.ingest.service import IngestService
from shared.lifecycle import run_service
from shared.registry.service import Registry
from tests.support.mailboxes import imap_profile, ready_mailbox

pytestmark = pytest.mark.peers

MESSAGES = 24
ATTACHMENT = 2 * 1024 * 1024          # ~2.7 MB once base64-encoded
LIMIT = 4 * 1024 * 1024               # the scaled-down batch limit, both services


def large_message(n: int) -> bytes:
    body = base64.encodebytes(os.urandom(ATTACHMENT)).replace(b"\n", b"\r\n")
    return (f"From: sender@customer.example\r\nTo: x@example.com\r\nSubject: Drawing {n}\r\n"
            f"Message-ID: <large-{n}@customer.example>\r\nDate: Fri, 27 Nov 2026 09:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
            f"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            f"Content-Disposition: attachment; filename=drawing-{n}.bin\r\n\r\n").encode() + body + b"--b--\r\n"


async def peak_while(run) -> int:
    tracemalloc.start()
    try:
        await run
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_a_batch_of_large_messages_is_never_held_whole(settings, registry: Registry, org, dovecot, pool,
                                                             monkeypatch) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, tracking="all")
    dovecot.deliver_many(box.email, [large_message(n) for n in range(MESSAGES)])
    total = MESSAGES * len(large_message(0))

    monkeypatch.setattr(imap_sync, "BATCH_BYTES", LIMIT)
    ingest_peak = await peak_while(run_service(IngestService(settings), burst=True))
    evaluate = EvaluateService(settings, evaluate_settings=EvaluateSettings(max_batch_bytes=LIMIT, health_aggregate=False))
    evaluate_peak = await peak_while(run_service(evaluate, burst=True))

    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM email_activity WHERE organization_id = $1", org.id) == MESSAGES
    # The whole backlog is ~69 MB of raw mail.  Measured: ingest ~34 MB (two batches being stored and
    # one being read, each also copied into its COPY; it held every message of a FETCH command, ~80 MB,
    # before), evaluate ~7 MB (~73 MB before).
    print(f"raw {total / 1e6:.1f} MB; peak ingest {ingest_peak / 1e6:.1f} MB, evaluate {evaluate_peak / 1e6:.1f} MB")
    assert ingest_peak < total * 3 / 4, ingest_peak
    assert evaluate_peak < total / 4, evaluate_peak
