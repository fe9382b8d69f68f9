"""The send ledger: every SQL statement of the dispatch service.

One ``outbound_email`` row per (organization, idempotency key).  Statements work on whole
batches (``unnest``) so a consumer batch costs a handful of round trips, not one per request.
Each state change writes its ``email.status`` event to the outbox in the same transaction.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Sequence
from uuid import UUID

import asyncpg

from shared.events.envelope import Envelope
from shared.events.payloads import ActivityCreatedV1, EmailStatusV1
from shared.events.topics import ACTIVITY_CREATED, EMAIL_STATUS
from shared.outbox import CHANNEL

PRODUCER = "dispatch"
# Namespace of the advisory locks dispatch workers hold on their numbers ("DSPC").
WORKER_LOCK_NAMESPACE = 0x44535043


# --------------------------------------------------------------------------- outbox, batched


def status_event(org_id: UUID, status: EmailStatusV1, correlation_id: str | None = None) -> tuple[str, str, Envelope[Any]]:
    return EMAIL_STATUS.name, status.idempotency_key, Envelope[EmailStatusV1](
        type=EMAIL_STATUS.name, schema_version=1, producer=PRODUCER, organization_id=org_id,
        correlation_id=correlation_id, data=status)


def activity_event(org_id: UUID, activity: ActivityCreatedV1, correlation_id: str | None = None) -> tuple[str, str, Envelope[Any]]:
    return ACTIVITY_CREATED.name, str(org_id), Envelope[ActivityCreatedV1](
        type=ACTIVITY_CREATED.name, schema_version=1, producer=PRODUCER, organization_id=org_id,
        correlation_id=correlation_id, data=activity)


async def enqueue_events(conn: asyncpg.Connection, events: Sequence[tuple[str, str, Envelope[Any]]]) -> None:
    """``shared.outbox.enqueue_many`` in one statement instead of one per event."""
    if not events:
        return
    await conn.execute(
        """INSERT INTO event_outbox (topic, key, payload)
           SELECT t, k, p::jsonb FROM unnest($1::text[], $2::text[], $3::text[]) AS u(t, k, p)""",
        [e[0] for e in events], [e[1] for e in events], [e[2].model_dump_json() for e in events],
    )
    await conn.execute("SELECT pg_notify($1, '')", CHANNEL)


# --------------------------------------------------------------------------- senders


async def resolve_senders(conn: asyncpg.Connection, wanted: Sequence[tuple[UUID, UUID | None, str | None]]) -> list[UUID | None]:
    """For each (organization, mailbox id, sender email): the mailbox in that organization.

    An address resolves to the mailbox with that address, or to the mailbox of the user or
    queue with that address.
    """
    if not wanted:
        return []
    rows = await conn.fetch(
        """SELECT i.n, (
               SELECT id FROM (
                   SELECT m.id, 1 AS rank FROM mailbox m WHERE i.mid IS NOT NULL AND m.id = i.mid AND m.organization_id = i.org
                   UNION ALL
                   SELECT m.id, 2 FROM mailbox m
                    WHERE i.mid IS NULL AND m.organization_id = i.org AND lower(m.email) = lower(i.email)
                   UNION ALL
                   SELECT m.id, 3 FROM crm_user u JOIN mailbox m ON m.owner_user_id = u.id
                    WHERE i.mid IS NULL AND u.organization_id = i.org AND lower(u.email) = lower(i.email)
                   UNION ALL
                   SELECT m.id, 4 FROM queue q JOIN mailbox m ON m.owner_queue_id = q.id
                    WHERE i.mid IS NULL AND q.organization_id = i.org AND lower(q.email) = lower(i.email)
               ) found ORDER BY rank LIMIT 1) AS mailbox_id
           FROM unnest($1::int[], $2::uuid[], $3::uuid[], $4::text[]) AS i(n, org, mid, email)
           ORDER BY i.n""",
        list(range(len(wanted))), [w[0] for w in wanted], [w[1] for w in wanted], [w[2] for w in wanted],
    )
    return [r["mailbox_id"] for r in rows]


async def mailbox_states(conn: asyncpg.Connection, mailbox_ids: Iterable[UUID]) -> dict[UUID, asyncpg.Record]:
    """What decides whether a mailbox may send (for the reason a request is refused)."""
    rows = await conn.fetch(
        """SELECT m.id, m.email, m.name, m.active, m.email_approved, m.profile_id, m.outgoing_status,
                  m.outgoing_backoff_until, m.outgoing_backoff_until > now() AS backed_off,
                  m.owner_user_id IS NULL AND m.owner_queue_id IS NULL AS forward,
                  coalesce(u.active, q.active) AS owner_active,
                  coalesce(u.outgoing_method, q.outgoing_method) AS owner_method
           FROM mailbox m LEFT JOIN crm_user u ON u.id = m.owner_user_id LEFT JOIN queue q ON q.id = m.owner_queue_id
           WHERE m.id = ANY($1::uuid[])""",
        list(set(mailbox_ids)),
    )
    return {r["id"]: r for r in rows}


async def organizations(conn: asyncpg.Connection, org_ids: Iterable[UUID]) -> dict[UUID, asyncpg.Record]:
    rows = await conn.fetch(
        """SELECT id, tracking_token_enabled, tracking_token_prefix, tracking_token_digits
           FROM organization WHERE id = ANY($1::uuid[])""", list(set(org_ids)))
    return {r["id"]: r for r in rows}


async def stored_content(conn: asyncpg.Connection, hashes: Iterable[str]) -> set[str]:
    rows = await conn.fetch("SELECT sha256 FROM raw_message WHERE sha256 = ANY($1::text[])", list(set(hashes)))
    return {r["sha256"] for r in rows}


async def tracking_numbers(conn: asyncpg.Connection, count: int) -> list[int]:
    if count == 0:
        return []
    return [r[0] for r in await conn.fetch("SELECT nextval('tracking_token_seq') FROM generate_series(1, $1)", count)]


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class NewRequest:
    id: UUID
    organization_id: UUID
    idempotency_key: str
    mailbox_id: UUID
    message_id: str
    subject: str
    tracking_token: str | None
    next_attempt_at: datetime | None  # None: now
    deadline: datetime
    request: dict[str, Any]
    event_id: UUID
    correlation_id: str | None
    requested_at: datetime


async def insert_requests(conn: asyncpg.Connection, rows: Sequence[NewRequest]) -> set[UUID]:
    """Insert new requests as pending_send; returns the ids actually written.

    A key already in the ledger is a no-op (a redelivery or a replay), except a key whose earlier
    request was rejected: nothing was sent for it, so the new request takes its place.
    """
    if not rows:
        return set()
    result = await conn.fetch(
        """INSERT INTO outbound_email AS o (id, organization_id, idempotency_key, mailbox_id, status, message_id,
                  subject, tracking_token, next_attempt_at, deadline, request, event_id, correlation_id, requested_at)
           SELECT u.id, u.org, u.key, u.mailbox, 'pending_send', u.mid, u.subject, u.token, coalesce(u.next_at, now()),
                  u.deadline, u.request::jsonb, u.event_id, u.corr, u.requested_at
           FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::text[], $6::text[], $7::text[],
                       $8::timestamptz[], $9::timestamptz[], $10::text[], $11::uuid[], $12::text[], $13::timestamptz[])
                AS u(id, org, key, mailbox, mid, subject, token, next_at, deadline, request, event_id, corr, requested_at)
           ON CONFLICT (organization_id, idempotency_key) DO UPDATE SET
                id = EXCLUDED.id, mailbox_id = EXCLUDED.mailbox_id, status = 'pending_send', reason = NULL,
                detail = NULL, message_id = EXCLUDED.message_id, subject = EXCLUDED.subject,
                tracking_token = EXCLUDED.tracking_token, next_attempt_at = EXCLUDED.next_attempt_at,
                deadline = EXCLUDED.deadline, request = EXCLUDED.request, event_id = EXCLUDED.event_id,
                correlation_id = EXCLUDED.correlation_id, requested_at = EXCLUDED.requested_at,
                attempts = 0, created_at = now(), updated_at = now()
           WHERE o.status = 'rejected'
           RETURNING o.id""",
        [r.id for r in rows], [r.organization_id for r in rows], [r.idempotency_key for r in rows],
        [r.mailbox_id for r in rows], [r.message_id for r in rows], [r.subject for r in rows],
        [r.tracking_token for r in rows], [r.next_attempt_at for r in rows], [r.deadline for r in rows],
        [json.dumps(r.request) for r in rows], [r.event_id for r in rows], [r.correlation_id for r in rows],
        [r.requested_at for r in rows],
    )
    return {r["id"] for r in result}


@dataclass(frozen=True, slots=True)
class RejectedRequest:
    organization_id: UUID
    idempotency_key: str
    mailbox_id: UUID | None
    reason: str
    detail: str
    request: dict[str, Any]
    event_id: UUID


async def record_rejections(conn: asyncpg.Connection, rows: Sequence[RejectedRequest]) -> list[bool]:
    """Record rejected requests; for each, whether a `rejected` status should be announced.

    Not announced: a key already used by an accepted request (the requester's final status for it
    stands).  A request of an unknown organization has no row but is announced.
    """
    if not rows:
        return []
    result = await conn.fetch(
        """WITH input AS (
               SELECT * FROM unnest($1::int[], $2::uuid[], $3::text[], $4::uuid[], $5::text[], $6::text[], $7::text[], $8::uuid[])
                   AS u(n, org, key, mailbox, reason, detail, request, event_id)),
           written AS (
               INSERT INTO outbound_email AS o (organization_id, idempotency_key, mailbox_id, status, reason, detail, request, event_id)
               SELECT i.org, i.key, (SELECT id FROM mailbox WHERE id = i.mailbox), 'rejected', i.reason, i.detail, i.request::jsonb, i.event_id
               FROM input i JOIN organization g ON g.id = i.org
               ON CONFLICT (organization_id, idempotency_key) DO UPDATE SET
                   reason = EXCLUDED.reason, detail = EXCLUDED.detail, request = EXCLUDED.request,
                   event_id = EXCLUDED.event_id, updated_at = now()
               WHERE o.status = 'rejected'
               RETURNING o.organization_id, o.idempotency_key)
           SELECT i.n, w.idempotency_key IS NOT NULL OR NOT EXISTS (SELECT 1 FROM organization WHERE id = i.org) AS announce
           FROM input i LEFT JOIN written w ON w.organization_id = i.org AND w.idempotency_key = i.key
           ORDER BY i.n""",
        list(range(len(rows))), [r.organization_id for r in rows], [r.idempotency_key for r in rows],
        [r.mailbox_id for r in rows], [r.reason for r in rows], [r.detail[:2000] for r in rows],
        [json.dumps(r.request) for r in rows], [r.event_id for r in rows],
    )
    return [r["announce"] for r in result]


_CLAIMED_COLUMNS = """o.id, o.organization_id, o.idempotency_key, o.mailbox_id, o.message_id, o.subject, o.tracking_token,
                      o.attempts, o.deadline, o.request, o.correlation_id, o.created_at, o.requested_at, o.reason,
                      o.detail, o.smtp_code, o.smtp_reply"""


async def claim(conn: asyncpg.Connection, ids: Sequence[UUID], worker_id: int) -> list[asyncpg.Record]:
    """Mark pending requests `sending` for this worker (committed before any mail transaction)."""
    if not ids:
        return []
    return await conn.fetch(
        f"""UPDATE outbound_email o SET status = 'sending', attempts = attempts + 1, worker_id = $2,
                   next_attempt_at = NULL, updated_at = now()
            WHERE o.id = ANY($1::uuid[]) AND o.status = 'pending_send'
            RETURNING {_CLAIMED_COLUMNS}""",
        list(ids), worker_id,
    )


async def lock_due(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    """Pending requests whose time has come, locked for this transaction (replicas skip them)."""
    return await conn.fetch(
        f"""SELECT {_CLAIMED_COLUMNS} FROM outbound_email o
            WHERE o.status = 'pending_send' AND o.next_attempt_at <= now()
            ORDER BY o.next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED""",
        limit,
    )


async def next_due_in(conn: asyncpg.Connection) -> float | None:
    """Seconds until the next pending request is due (0 if one is due), None if none waits."""
    value = await conn.fetchval(
        """SELECT extract(epoch FROM min(next_attempt_at) - now()) FROM outbound_email WHERE status = 'pending_send'""")
    return None if value is None else max(0.0, float(value))


async def postpone(conn: asyncpg.Connection, rows: Sequence[tuple[UUID, datetime, str | None, str | None]]) -> None:
    """Leave pending requests pending, due later (a mailbox in back-off): (id, when, reason, detail)."""
    if rows:
        await conn.execute(
            """UPDATE outbound_email o SET next_attempt_at = u.at, reason = u.reason, detail = u.detail, updated_at = now()
               FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[]) AS u(id, at, reason, detail)
               WHERE o.id = u.id AND o.status = 'pending_send'""",
            [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
        )


@dataclass(slots=True)
class Outcome:
    id: UUID
    status: str  # sent, failed or pending_send (retry later)
    transport: str | None = None
    reason: str | None = None
    detail: str | None = None
    smtp_code: int | None = None
    smtp_reply: str | None = None
    next_attempt_at: datetime | None = None
    activity_id: UUID | None = None


async def record_outcomes(conn: asyncpg.Connection, outcomes: Sequence[Outcome], worker_id: int | None,
                          *, from_status: str = "sending") -> set[UUID]:
    """Write outcomes of rows this worker holds; returns the ids updated."""
    if not outcomes:
        return set()
    rows = await conn.fetch(
        """UPDATE outbound_email o SET status = u.status, transport = coalesce(u.transport, o.transport),
                  reason = u.reason, detail = u.detail, smtp_code = u.code, smtp_reply = u.reply,
                  next_attempt_at = u.next_at, activity_id = coalesce(u.activity, o.activity_id),
                  sent_at = CASE WHEN u.status = 'sent' THEN now() ELSE o.sent_at END,
                  worker_id = NULL, updated_at = now()
           FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::text[],
                       $8::timestamptz[], $9::uuid[]) AS u(id, status, transport, reason, detail, code, reply, next_at, activity)
           WHERE o.id = u.id AND o.status = $10 AND ($11::bigint IS NULL OR o.worker_id = $11)
           RETURNING o.id""",
        [o.id for o in outcomes], [o.status for o in outcomes], [o.transport for o in outcomes],
        [o.reason for o in outcomes], [(o.detail or "")[:2000] or None for o in outcomes],
        [o.smtp_code for o in outcomes], [(o.smtp_reply or "")[:2000] or None for o in outcomes],
        [o.next_attempt_at for o in outcomes], [o.activity_id for o in outcomes], from_status, worker_id,
    )
    return {r["id"] for r in rows}


# --------------------------------------------------------------------------- activities


@dataclass(frozen=True, slots=True)
class SentActivity:
    id: UUID
    organization_id: UUID
    mailbox_id: UUID
    message_id: str
    subject: str
    normalized_subject: str
    from_address: str
    to: list[str]
    cc: list[str]
    regarding_kind: str | None
    regarding_id: UUID | None
    tracking_token: str | None
    thread_root: str
    preview: str


async def insert_activities(conn: asyncpg.Connection, rows: Sequence[SentActivity]) -> dict[str, UUID]:
    """Record outgoing email activities (one per Message-ID); returns message id -> activity id."""
    if not rows:
        return {}
    await conn.execute(
        """INSERT INTO email_activity (id, organization_id, message_id, direction, status, subject, normalized_subject,
                  from_address, to_addresses, cc_addresses, regarding_kind, regarding_id, tracking_token, thread_root,
                  preview, sent_at)
           SELECT u.id, u.org, u.mid, 'outgoing', 'sent', u.subject, u.norm, u.sender, u.to_list::text[], u.cc_list::text[],
                  u.rkind, u.rid, u.token, u.root, u.preview, now()
           FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                       $9::text[], $10::uuid[], $11::text[], $12::text[], $13::text[])
                AS u(id, org, mid, subject, norm, sender, to_list, cc_list, rkind, rid, token, root, preview)
           ON CONFLICT (organization_id, message_id) DO NOTHING""",
        [r.id for r in rows], [r.organization_id for r in rows], [r.message_id for r in rows], [r.subject for r in rows],
        [r.normalized_subject for r in rows], [r.from_address for r in rows],
        [_pg_array(r.to) for r in rows], [_pg_array(r.cc) for r in rows],
        [r.regarding_kind for r in rows], [r.regarding_id for r in rows], [r.tracking_token for r in rows],
        [r.thread_root for r in rows], [r.preview for r in rows],
    )
    found = await conn.fetch(
        "SELECT id, organization_id, message_id FROM email_activity WHERE (organization_id, message_id) IN "
        "(SELECT * FROM unnest($1::uuid[], $2::text[]))",
        [r.organization_id for r in rows], [r.message_id for r in rows],
    )
    ids = {r["message_id"]: r["id"] for r in found}
    await conn.execute(
        """INSERT INTO email_activity_mailbox (activity_id, mailbox_id)
           SELECT * FROM unnest($1::uuid[], $2::uuid[]) ON CONFLICT DO NOTHING""",
        [ids[r.message_id] for r in rows if r.message_id in ids], [r.mailbox_id for r in rows if r.message_id in ids],
    )
    return ids


def _pg_array(values: list[str]) -> str:
    """A text[] literal (addresses are validated: no quotes or backslashes to escape, but be safe)."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


# --------------------------------------------------------------------------- workers and orphans


async def register_worker(conn: asyncpg.Connection) -> int:
    """A number for this worker, locked for as long as ``conn`` lives."""
    worker_id = await conn.fetchval("SELECT nextval('dispatch_worker_seq')")
    await conn.execute("SELECT pg_advisory_lock($1, $2::int)", WORKER_LOCK_NAMESPACE, worker_id)
    return worker_id


async def orphan_workers(conn: asyncpg.Connection, me: int) -> list[int]:
    rows = await conn.fetch(
        "SELECT DISTINCT worker_id FROM outbound_email WHERE status = 'sending' AND worker_id IS NOT NULL AND worker_id <> $1",
        me)
    return [r["worker_id"] for r in rows]


async def try_lock_worker(conn: asyncpg.Connection, worker_id: int) -> bool:
    return await conn.fetchval("SELECT pg_try_advisory_lock($1, $2::int)", WORKER_LOCK_NAMESPACE, worker_id)


async def unlock_worker(conn: asyncpg.Connection, worker_id: int) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1, $2::int)", WORKER_LOCK_NAMESPACE, worker_id)


async def sending_of(conn: asyncpg.Connection, worker_id: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {_CLAIMED_COLUMNS}, o.transport FROM outbound_email o WHERE o.status = 'sending' AND o.worker_id = $1 FOR UPDATE",
        worker_id)
