"""Held messages: what evaluate keeps of a message it holds instead of deciding, and its SQL.

A message is held when its mailbox may not process email for now (``chains.PAUSED_MAILBOX``), or
when older messages of the mailbox are held.  Its decision row says so (``email_decision.held``);
``held_message`` keeps the ``email.received`` event, so the message can be evaluated again, in the
order it was held, once the mailbox may process email (``release.py``).  Both are written in the
batch's transaction, before the consumer commits the offset, and both end in the transaction that
records the final decision: a crash at any point leaves the message held or decided, never lost.

A message has one held event, the newest: when ingest announces it again while it is held (moved
into a folder a folder-level tracking rule maps), that event takes the held one's place, and the
message keeps its place in the order; an older event (a redelivery, a replay) takes no newer one's
place.  Newer by the events' ``occurred_at``, the order the decisions follow (``record_decisions``).
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

# One replica at a time evaluates held messages again: two would do the same work twice (harmlessly,
# the natural keys see to that, but for nothing).
_RELEASE_LOCK = 0x48656C64  # "Held"


@dataclass(frozen=True, slots=True)
class HeldMessage:
    """One message held for one mailbox, with the event to evaluate again."""

    organization_id: UUID
    mailbox_id: UUID
    message_id: str
    forwarded: bool
    raw_sha256: str
    event: dict[str, Any]

    @property
    def occurred_at(self) -> datetime:
        """When its event was published (the envelope's ``occurred_at``)."""
        return datetime.fromisoformat(self.event["occurred_at"])


async def hold(conn: asyncpg.Connection, rows: Sequence[HeldMessage]) -> None:
    """Keep the events of messages whose decision is held, in the batch's order.

    Only where the recorded decision is held, or was made from an older event: a message decided
    before and announced again (moved into a mapped folder) while its mailbox may not process email
    is held until it may, not dropped; a redelivery of the event it was decided from is not held
    again.  A message already held keeps its place and since when it is held, and takes the event
    if it is newer than the held one."""
    if not rows:
        return
    # One row per message (an upsert may not touch a row twice in one statement): its newest event,
    # at the place of its first one.
    newest: dict[tuple[UUID, str], HeldMessage] = {}
    for r in rows:
        key = (r.mailbox_id, r.message_id)
        if key not in newest or r.occurred_at > newest[key].occurred_at:
            newest[key] = r   # a dict keeps a key's first place
    rows = list(newest.values())
    await conn.execute(
        """INSERT INTO held_message (organization_id, mailbox_id, message_id, forwarded, raw_sha256, event)
           SELECT t.org, t.mailbox, t.mid, t.fwd, t.sha, t.event::jsonb
           FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bool[], $5::text[], $6::text[], $7::timestamptz[])
                WITH ORDINALITY AS t(org, mailbox, mid, fwd, sha, event, at, n)
           WHERE EXISTS (SELECT 1 FROM email_decision d WHERE d.mailbox_id = t.mailbox AND d.message_id = t.mid
                         AND (d.held OR d.event_at IS NULL OR d.event_at < t.at))
           ORDER BY t.n
           ON CONFLICT (mailbox_id, message_id) DO UPDATE
               SET event = excluded.event, raw_sha256 = excluded.raw_sha256, forwarded = excluded.forwarded
               WHERE (excluded.event->>'occurred_at')::timestamptz > (held_message.event->>'occurred_at')::timestamptz""",
        [r.organization_id for r in rows], [r.mailbox_id for r in rows], [r.message_id for r in rows],
        [r.forwarded for r in rows], [r.raw_sha256 for r in rows], [json.dumps(r.event) for r in rows],
        [r.occurred_at for r in rows],
    )


async def let_go(conn: asyncpg.Connection, keys: Sequence[tuple[UUID, str]], *, whatever_event: bool = False) -> int:
    """Forget the held events of messages decided for good in this transaction; how many there were.

    A held event newer than the decision recorded stays (unless ``whatever_event``): it took the place
    of the one decided while that one was evaluated (the message's move announced as a release
    evaluated its older event), and is evaluated at the next look (``let_go_evaluated`` forgets it
    then, whatever it decides)."""
    if not keys:
        return 0
    rows = await conn.fetch(
        """DELETE FROM held_message h USING unnest($1::uuid[], $2::text[]) AS k(mailbox, mid)
           WHERE h.mailbox_id = k.mailbox AND h.message_id = k.mid
             AND ($3 OR NOT EXISTS (SELECT 1 FROM email_decision d WHERE d.mailbox_id = h.mailbox_id
                                   AND d.message_id = h.message_id AND d.event_at < (h.event->>'occurred_at')::timestamptz))
           RETURNING 1""",
        [m for m, _ in keys], [k for _, k in keys], whatever_event,
    )
    return len(rows)


async def let_go_evaluated(conn: asyncpg.Connection, evaluated: Sequence[tuple[UUID, str, UUID]]) -> int:
    """After a release batch committed: forget the held events it evaluated again, by (mailbox,
    Message-ID, event id), whose message is decided for good, where ``let_go`` kept them because
    the decision was not made from them (a decision made from an older event that this one did not
    replace: the rule of the folder it was moved to removed since, say).  Kept, such an event would
    be evaluated again at every look, and its mailbox's newer mail would wait behind it for ever.
    An event that took its place since (another event id) stays.  How many there were."""
    if not evaluated:
        return 0
    rows = await conn.fetch(
        """DELETE FROM held_message h USING unnest($1::uuid[], $2::text[], $3::text[]) AS k(mailbox, mid, event_id)
           WHERE h.mailbox_id = k.mailbox AND h.message_id = k.mid AND h.event->>'event_id' = k.event_id
             AND EXISTS (SELECT 1 FROM email_decision d WHERE d.mailbox_id = h.mailbox_id
                         AND d.message_id = h.message_id AND NOT d.held)
           RETURNING 1""",
        [m for m, _, _ in evaluated], [k for _, k, _ in evaluated], [str(e) for _, _, e in evaluated],
    )
    return len(rows)


async def holding(conn: asyncpg.Connection, keys: Sequence[tuple[UUID, bool]]) -> set[tuple[UUID, bool]]:
    """Those of the (mailbox, forwarded) pairs that have held messages (newer mail of the same kind
    waits behind them).  By pair: a user's own mail and the mail they forward read different
    settings, so one kind held must not hold the other."""
    if not keys:
        return set()
    unique = list(set(keys))
    rows = await conn.fetch(
        """SELECT k.m, k.f FROM unnest($1::uuid[], $2::bool[]) AS k(m, f)
           WHERE EXISTS (SELECT 1 FROM held_message h WHERE h.mailbox_id = k.m AND h.forwarded = k.f)""",
        [m for m, _ in unique], [f for _, f in unique],
    )
    return {(r["m"], r["f"]) for r in rows}


async def decide_orphans(conn: asyncpg.Connection, keys: Sequence[tuple[UUID, str]]) -> int:
    """Held messages evaluated again that no longer belong to the mailbox they were held for (their
    forwarder is no longer that user or queue) or could not be evaluated: decided for good there,
    not tracked, and their held events let go.  How many there were."""
    if not keys:
        return 0
    await conn.execute(
        """UPDATE email_decision d SET held = false, tracked = false, activity_id = NULL, rule = 'forward_attribution',
               reason = 'no_longer_for_this_mailbox', decided_at = now(),
               explanation = 'Not tracked here: held for this mailbox, and when evaluated again it no longer belonged '
                             'to it (its forwarder is no longer this user or queue, or it could not be read again).'
           FROM unnest($1::uuid[], $2::text[]) AS k(m, mid)
           WHERE d.mailbox_id = k.m AND d.message_id = k.mid AND d.held""",
        [m for m, _ in keys], [k for _, k in keys],
    )
    # Every one, whatever its event: each was evaluated again and is no longer this mailbox's (or cannot
    # be read), so nothing of it waits here.
    return await let_go(conn, keys, whatever_event=True)


async def mailboxes_holding(conn: asyncpg.Connection) -> set[tuple[UUID, bool]]:
    """Every (mailbox, forwarded) pair with held messages."""
    rows = await conn.fetch("SELECT DISTINCT mailbox_id, forwarded FROM held_message")
    return {(r["mailbox_id"], r["forwarded"]) for r in rows}


async def oldest(conn: asyncpg.Connection, mailboxes: Sequence[tuple[UUID, bool]], limit: int) -> list[asyncpg.Record]:
    """The first ``limit`` messages held for these (mailbox, forwarded) pairs, in the order they were held."""
    return await conn.fetch(
        """SELECT h.mailbox_id, h.message_id, h.event FROM held_message h
           JOIN unnest($1::uuid[], $2::bool[]) AS k(mailbox, fwd) ON h.mailbox_id = k.mailbox AND h.forwarded = k.fwd
           ORDER BY h.seq LIMIT $3""",
        [m for m, _ in mailboxes], [f for _, f in mailboxes], limit,
    )


@asynccontextmanager
async def releasing_alone(pool: asyncpg.Pool) -> AsyncIterator[bool]:
    """True inside when this process may release held messages now; False while another does."""
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _RELEASE_LOCK):
            yield False
            return
        try:
            yield True
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _RELEASE_LOCK)


async def held_since(conn: asyncpg.Connection, org_id: UUID, message_id: str) -> dict[UUID, datetime]:
    """Mailbox -> since when this message is held for it: what `conduit message why` says is waiting."""
    rows = await conn.fetch(
        """SELECT mailbox_id, held_since FROM held_message
           WHERE organization_id = $1 AND (message_id = $2 OR message_id = trim(both '<>' from $2))""",
        org_id, message_id,
    )
    return {r["mailbox_id"]: r["held_since"] for r in rows}
