"""Mail in, end to end, for the mail that real servers carry and tidy test data does not: values
too large for PostgreSQL's indexes, copies of a message without a Message-ID in several mailboxes,
and mail redirected (RFC 5322 Resent-* fields) rather than forwarded to a forward mailbox.

Messages go in with a real IMAP APPEND to Dovecot; ingest and evaluate run for real, in burst mode.
"""
from __future__ import annotations

import base64
import random

import asyncpg
import pytest

from services.evaluate.service import EvaluateService
from services.ingest.service import IngestService
from shared.lifecycle import run_service
from shared.registry.service import Registry
from tests.support.mailboxes import imap_profile, message, ready_mailbox

pytestmark = pytest.mark.peers

# PostgreSQL refuses a btree entry larger than this; random text does not compress below it.
BTREE_LIMIT = 2704


async def pipeline(settings) -> None:
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)


async def activities(pool: asyncpg.Pool, org) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await conn.fetch(
            """SELECT a.*, array_agg(am.mailbox_id) AS mailboxes FROM email_activity a
               JOIN email_activity_mailbox am ON am.activity_id = a.id WHERE a.organization_id = $1 GROUP BY a.id""", org.id)


async def decisions(pool: asyncpg.Pool, org) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await conn.fetch("SELECT * FROM email_decision WHERE organization_id = $1", org.id)


def random_cjk(count: int, seed: int) -> str:
    """``count`` random CJK ideographs: three UTF-8 bytes each, and nothing for a compressor to find."""
    rng = random.Random(seed)
    return "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(count))


def encoded_subject(text: str) -> bytes:
    """``text`` as RFC 2047 base64 words of 15 characters, one per folded line, as mailers send it."""
    words = [f"=?utf-8?B?{base64.b64encode(text[i:i + 15].encode()).decode()}?=" for i in range(0, len(text), 15)]
    return "\r\n ".join(words).encode()


async def test_oversized_subject_and_message_id_do_not_stop_evaluation(settings, registry: Registry, org, dovecot,
                                                                        pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, tracking="all")
    subject = random_cjk(6_800, seed=1)  # ~20 KB of UTF-8
    long_id = random_cjk(970, seed=2) + "@customer.example"  # 987 characters, ~2,900 bytes
    assert len(long_id) < 995 and len(long_id.encode()) > BTREE_LIMIT
    big_subject = (b"From: cust@customer.example\r\nTo: " + box.email.encode() + b"\r\nSubject: " + encoded_subject(subject)
                   + b"\r\nMessage-ID: <big-subject@customer.example>\r\nDate: Fri, 27 Nov 2026 09:00:00 +0000\r\n"
                   b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nHi.\r\n")
    await dovecot.append(box.email, box.password, big_subject)
    # RFC 6532 allows UTF-8 in a Message-ID, so the header carries it as it is.
    await dovecot.append(box.email, box.password, message("long id", to=box.email, message_id=f"<{long_id}>"))
    await dovecot.append(box.email, box.password, message("after them", to=box.email, message_id="<after@customer.example>"))
    await pipeline(settings)

    acts = {a["message_id"]: a for a in await activities(pool, org)}
    assert len(acts) == 3, sorted(acts)
    assert acts["big-subject@customer.example"]["subject"] == subject
    assert len(acts["big-subject@customer.example"]["normalized_subject"]) <= 255
    long_id_activity = next(a for a in acts.values() if a["subject"] == "long id")
    assert long_id_activity["message_id"].endswith("@generated.invalid")  # too long to be a key: counts as missing
    assert acts["after@customer.example"]["subject"] == "after them"
    assert sorted(d["tracked"] for d in await decisions(pool, org)) == [True, True, True]


async def test_message_without_message_id_in_two_mailboxes_is_one_activity(settings, registry: Registry, org, dovecot,
                                                                            pool) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    ann = await ready_mailbox(registry, org, dovecot, tracking="all")
    bob = await ready_mailbox(registry, org, dovecot, tracking="all")
    base = (f"From: Cust <cust@customer.example>\r\nTo: {ann.email}, {bob.email}\r\nSubject: no id here\r\n"
            "Date: Fri, 27 Nov 2026 09:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
            "One message, two copies.\r\n").encode()
    # Each copy as that mailbox's delivery agent left it: its own trace fields on top.
    for box, mx in ((ann, "mx1"), (bob, "mx2")):
        trace = (f"Return-Path: <cust@customer.example>\r\nDelivered-To: {box.email}\r\nX-Original-To: {box.email}\r\n"
                 f"Received: from {mx}.customer.example by imap.example.com for <{box.email}>; "
                 f"Fri, 27 Nov 2026 09:00:0{1 if mx == 'mx1' else 2} +0000\r\n").encode()
        await dovecot.append(box.email, box.password, trace + base)
    await pipeline(settings)

    acts = await activities(pool, org)
    assert len(acts) == 1, [a["message_id"] for a in acts]
    assert set(acts[0]["mailboxes"]) == {ann.id, bob.id}
    assert acts[0]["message_id"].endswith("@generated.invalid")
    found = await decisions(pool, org)
    assert sorted((d["mailbox_id"], d["tracked"], d["message_id"]) for d in found) == sorted(
        [(ann.id, True, acts[0]["message_id"]), (bob.id, True, acts[0]["message_id"])])


async def _forward_mailbox_and_user(registry: Registry, org, dovecot, name: str, email: str):
    """A forward mailbox on the test Dovecot, and a user whose mail reaches Conduit through it."""
    await registry.add_profile(org, imap_profile(dovecot))
    forward = await ready_mailbox(registry, org, dovecot, owner="forward")
    user = await registry.add_user(org, name, email, incoming="forward_mailbox")
    await registry.update_mailbox(org, user.email, email_approved=True, tracking="all")
    return forward, user


async def test_redirected_mail_is_attributed_to_who_redirected_it(settings, registry: Registry, org, dovecot,
                                                                   pool) -> None:
    forward, user = await _forward_mailbox_and_user(registry, org, dovecot, "Rita", "rita@example.com")
    # Redirected ("bounced", RFC 5322 3.6.6): the author's message unchanged, the Resent-* block on top.
    redirected = (f"Resent-From: Rita <rita@example.com>\r\nResent-To: {forward.email}\r\n"
                  "Resent-Date: Fri, 27 Nov 2026 10:00:00 +0000\r\nResent-Message-ID: <resent-1@example.com>\r\n"
                  ).encode() + message("Question from a customer", sender="Cust <cust@customer.example>",
                                       to="rita@example.com", message_id="<redirected-1@customer.example>")
    await dovecot.append(forward.email, forward.password, redirected)
    await pipeline(settings)

    acts = await activities(pool, org)
    assert [(a["subject"], a["mailboxes"]) for a in acts] == [("Question from a customer", [user.mailbox_id])]
    assert acts[0]["from_address"] == "cust@customer.example"
    assert [(d["mailbox_id"], d["tracked"]) for d in await decisions(pool, org)] == [(user.mailbox_id, True)]


async def test_mail_forwarded_by_an_inactive_user_is_held_for_them_not_tracked(settings, registry: Registry, org, dovecot,
                                                                     pool) -> None:
    forward, user = await _forward_mailbox_and_user(registry, org, dovecot, "Ines", "ines@example.com")
    async with pool.acquire() as conn:
        await conn.execute("UPDATE crm_user SET active = false WHERE id = $1", user.id)
    await dovecot.append(forward.email, forward.password,
                         message("Fwd: Offer", sender="Ines <ines@example.com>", to=forward.email,
                                 message_id="<inactive-1@example.com>"))
    await pipeline(settings)

    assert await activities(pool, org) == []
    found = await decisions(pool, org)
    # Held for Ines (evaluated again once active: tests/integration/test_held_messages.py), never tracked meanwhile.
    assert [(d["mailbox_id"], d["tracked"], d["reason"]) for d in found] == [(user.mailbox_id, False, "mailbox_inactive")]
