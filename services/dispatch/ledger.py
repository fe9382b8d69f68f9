"""The send ledger: every SQL statement of the dispatch service.

One ``outbound_email`` row per (organization, idempotency key).  Statements work on whole
batches (``unnest``) so a consumer batch costs a handful of round trips, not one per request.
Each state change writes its ``email.status`` event to the outbox in the same transaction.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Sequence
from uuid import UUID

import asyncpg

from shared.events.envelope import Envelope
from shared.events.payloads import ActivityCreatedV1, EmailOutboundV1, EmailStatusV1
from shared.events.topics import ACTIVITY_CREATED, EMAIL_STATUS
from shared.ids import new_id
from shared.outbox import enqueue_batch

PRODUCER = "dispatch"
# Namespace of the advisory locks dispatch workers hold on their numbers ("DSPC").
WORKER_LOCK_NAMESPACE = 0x44535043


# --------------------------------------------------------------------------- outbox, batched

# The parametrised envelope classes, looked up once (each ``Envelope[X]`` costs a cache look-up).
_STATUS_ENVELOPE = Envelope[EmailStatusV1]
_ACTIVITY_ENVELOPE = Envelope[ActivityCreatedV1]


def status_event(org_id: UUID, status: EmailStatusV1, correlation_id: str | None = None) -> tuple[str, str, Envelope[Any]]:
    return EMAIL_STATUS.name, status.idempotency_key, _STATUS_ENVELOPE(
        event_id=new_id(), type=EMAIL_STATUS.name, schema_version=1, producer=PRODUCER, organization_id=org_id,
        correlation_id=correlation_id, data=status)


def activity_event(org_id: UUID, activity: ActivityCreatedV1, correlation_id: str | None = None) -> tuple[str, str, Envelope[Any]]:
    return ACTIVITY_CREATED.name, str(org_id), _ACTIVITY_ENVELOPE(
        event_id=new_id(), type=ACTIVITY_CREATED.name, schema_version=1, producer=PRODUCER, organization_id=org_id,
        correlation_id=correlation_id, data=activity)


async def enqueue_events(conn: asyncpg.Connection, events: Sequence[tuple[str, str, Envelope[Any]]]) -> None:
    """A transaction's events, in order, as one outbox row (``shared.outbox.enqueue_batch``)."""
    await enqueue_batch(conn, [(topic, key, event.model_dump_json()) for topic, key, event in events])


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


# Refusals an administrator mends in passing (a mailbox deactivated for a moment, approval or Test &
# Enable pending, its owner inactive): a request accepted before waits for them, until its deadline,
# as the reference's Pending Send does.  No mailbox, or one that only receives, will not send at all.
PASSING_REFUSALS = frozenset({"mailbox_inactive", "no_profile", "email_not_approved", "owner_inactive",
                              "outgoing_not_enabled"})
# The reasons of a pending request that waits for its mailbox (those, or its back-off) rather than
# after a failed attempt.  ``shared.registry.models.WAITING_FOR_MAILBOX`` (what `conduit outbound show`
# says) is the same set.
WAITING_FOR_MAILBOX = PASSING_REFUSALS | {"mailbox_backoff"}


def refusal(state: asyncpg.Record | None) -> tuple[str, str] | None:
    """Why a mailbox may not send, in the order an administrator would fix it; None if it may."""
    if state is None:
        return "unknown_mailbox", "no such mailbox in the organization"
    if not state["active"]:
        return "mailbox_inactive", f"the mailbox {state['email']} is inactive"
    if state["profile_id"] is None:
        return "no_profile", f"the mailbox {state['email']} has no email server profile"
    if not state["email_approved"]:
        return "email_not_approved", f"the email address {state['email']} is not approved"
    if state["forward"]:
        return "forward_mailbox", "a forward mailbox receives email only"
    if not state["owner_active"]:
        return "owner_inactive", "the mailbox's user or queue is inactive"
    if state["owner_method"] != "server_side_sync":
        return "outgoing_not_enabled", "the owner's outgoing email is not delivered by server-side synchronization"
    if state["outgoing_status"] != "success":
        return "outgoing_not_enabled", "outgoing email is not enabled for this mailbox (run Test & Enable)"
    return None


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


async def stored_content(conn: asyncpg.Connection, hashes: Iterable[str]) -> dict[str, int]:
    """The size of each of ``hashes`` the raw store holds (attachments by reference)."""
    rows = await conn.fetch("SELECT sha256, size FROM raw_message WHERE sha256 = ANY($1::text[])", list(set(hashes)))
    return {r["sha256"]: r["size"] for r in rows}


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
    request: str  # the request as JSON
    event_id: UUID
    correlation_id: str | None
    requested_at: datetime
    # Why a request accepted to wait (``next_attempt_at`` later than now) waits: on its row from the
    # start, so `conduit outbound show` says it as the status event does.
    reason: str | None = None
    detail: str | None = None


async def insert_requests(conn: asyncpg.Connection, rows: Sequence[NewRequest], claim: set[UUID] = frozenset(),
                          worker_id: int | None = None, claim_id: UUID | None = None) -> list[asyncpg.Record]:
    """Insert new requests as pending_send, or, for the ids in ``claim``, as claimed (``sending`` for
    ``worker_id``, attempt 1: what ``claim`` would make of them, without a second write); returns the
    rows actually written, with the claimed columns (``request`` left out: the caller has it) and ``status``.

    A key already in the ledger is a no-op (a redelivery or a replay), except a key whose earlier
    request was rejected: nothing was sent for it, so the new request takes its place.  Whether a
    request left out is the one holding its key, or another that reuses it: ``key_holders``.
    """
    if not rows:
        return []
    return await conn.fetch(
        f"""INSERT INTO outbound_email AS o (id, organization_id, idempotency_key, mailbox_id, status, message_id,
                  subject, tracking_token, next_attempt_at, deadline, request, event_id, correlation_id, requested_at,
                  worker_id, attempts, claim_id, reason, detail)
           SELECT u.id, u.org, u.key, u.mailbox, CASE WHEN u.claimed THEN 'sending' ELSE 'pending_send' END, u.mid,
                  u.subject, u.token, CASE WHEN u.claimed THEN NULL ELSE coalesce(u.next_at, now()) END,
                  u.deadline, u.request::jsonb, u.event_id, u.corr, u.requested_at,
                  CASE WHEN u.claimed THEN $15::bigint END, CASE WHEN u.claimed THEN 1 ELSE 0 END,
                  CASE WHEN u.claimed THEN $16::uuid END, u.reason, u.detail
           FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::text[], $6::text[], $7::text[],
                       $8::timestamptz[], $9::timestamptz[], $10::text[], $11::uuid[], $12::text[], $13::timestamptz[],
                       $14::bool[], $17::text[], $18::text[])
                AS u(id, org, key, mailbox, mid, subject, token, next_at, deadline, request, event_id, corr, requested_at,
                     claimed, reason, detail)
           ON CONFLICT (organization_id, idempotency_key) DO UPDATE SET
                id = EXCLUDED.id, mailbox_id = EXCLUDED.mailbox_id, status = EXCLUDED.status, reason = EXCLUDED.reason,
                detail = EXCLUDED.detail, message_id = EXCLUDED.message_id, subject = EXCLUDED.subject,
                tracking_token = EXCLUDED.tracking_token, next_attempt_at = EXCLUDED.next_attempt_at,
                deadline = EXCLUDED.deadline, request = EXCLUDED.request, event_id = EXCLUDED.event_id,
                correlation_id = EXCLUDED.correlation_id, requested_at = EXCLUDED.requested_at,
                worker_id = EXCLUDED.worker_id, attempts = EXCLUDED.attempts, claim_id = EXCLUDED.claim_id,
                started_at = NULL, created_at = now(),
                updated_at = now()
           WHERE o.status = 'rejected'
           RETURNING {_CLAIMED_COLUMNS.replace("o.request,", "NULL::jsonb AS request,")}, o.status""",
        [r.id for r in rows], [r.organization_id for r in rows], [r.idempotency_key for r in rows],
        [r.mailbox_id for r in rows], [r.message_id for r in rows], [r.subject for r in rows],
        [r.tracking_token for r in rows], [r.next_attempt_at for r in rows], [r.deadline for r in rows],
        [r.request for r in rows], [r.event_id for r in rows], [r.correlation_id for r in rows],
        [r.requested_at for r in rows], [r.id in claim for r in rows], worker_id, claim_id,
        [r.reason for r in rows], [r.detail for r in rows],
    )


def stored_request(request: EmailOutboundV1) -> str:
    """A request as the ledger stores it (``NewRequest.request``), and compares it with another under
    the same key (``key_holders``)."""
    return request.model_dump_json(exclude_defaults=True)


async def key_holders(conn: asyncpg.Connection, wanted: Sequence[tuple[UUID, str, str]]) -> list[asyncpg.Record]:
    """For each (organization, idempotency key, request as ``NewRequest.request`` has it): the ``status``
    of the request that holds the key, and whether it is the same request (``same``: equal as jsonb,
    so key order and spacing aside); both None when no row holds it."""
    return await conn.fetch(
        """SELECT o.status, o.request = i.request::jsonb AS same
           FROM unnest($1::int[], $2::uuid[], $3::text[], $4::text[]) AS i(n, org, key, request)
           LEFT JOIN outbound_email o ON o.organization_id = i.org AND o.idempotency_key = i.key
           ORDER BY i.n""",
        list(range(len(wanted))), [w[0] for w in wanted], [w[1] for w in wanted], [w[2] for w in wanted],
    )


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
    stands).  A request of an unknown organization has no row but is announced.  A key refused more
    than once in a batch (a requester retrying a bad request) keeps the last refusal, as if they came
    one after the other: one statement cannot write a row twice.
    """
    if not rows:
        return []
    result = await conn.fetch(
        """WITH input AS (
               SELECT * FROM unnest($1::int[], $2::uuid[], $3::text[], $4::uuid[], $5::text[], $6::text[], $7::text[], $8::uuid[])
                   AS u(n, org, key, mailbox, reason, detail, request, event_id)),
           written AS (
               INSERT INTO outbound_email AS o (organization_id, idempotency_key, mailbox_id, status, reason, detail, request,
                                                 event_id, subject)
               SELECT DISTINCT ON (i.org, i.key) i.org, i.key, (SELECT id FROM mailbox WHERE id = i.mailbox), 'rejected',
                      i.reason, i.detail, i.request::jsonb, i.event_id,
                      -- The subject as requested (never sent, so no tracking token), for `conduit outbound
                      -- list` and `show`; the request may hold anything, so only a string, cut as detail is.
                      CASE WHEN jsonb_typeof(i.request::jsonb -> 'subject') = 'string'
                           THEN left(i.request::jsonb ->> 'subject', 2000) END
               FROM input i JOIN organization g ON g.id = i.org
               ORDER BY i.org, i.key, i.n DESC
               ON CONFLICT (organization_id, idempotency_key) DO UPDATE SET
                   reason = EXCLUDED.reason, detail = EXCLUDED.detail, request = EXCLUDED.request,
                   event_id = EXCLUDED.event_id, subject = EXCLUDED.subject, updated_at = now()
               WHERE o.status = 'rejected'
               RETURNING o.organization_id, o.idempotency_key)
           SELECT i.n, w.idempotency_key IS NOT NULL OR NOT EXISTS (SELECT 1 FROM organization WHERE id = i.org) AS announce
           FROM input i LEFT JOIN written w ON w.organization_id = i.org AND w.idempotency_key = i.key
           ORDER BY i.n""",
        list(range(len(rows))), [r.organization_id for r in rows], [r.idempotency_key for r in rows],
        [r.mailbox_id for r in rows], [r.reason for r in rows], [storable_text(r.detail[:2000]) for r in rows],
        [_storable_json(r.request) for r in rows], [r.event_id for r in rows],
    )
    return [r["announce"] for r in result]


def storable_text(text: str | None) -> str | None:
    """``text`` as PostgreSQL can store it: text columns and jsonb refuse NUL, which a server's reply
    or another system's payload may hold."""
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


def _storable_json(value: Any) -> str:
    """A refused request's payload as jsonb takes it: NUL replaced in every string, and the numbers
    JSON has no form for (NaN, Infinity, which Python's JSON reader accepts) stored as null."""
    def clean(v: Any) -> Any:
        if isinstance(v, str):
            return storable_text(v)
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {storable_text(str(k)): clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(value))


_CLAIMED_COLUMNS = """o.id, o.organization_id, o.idempotency_key, o.mailbox_id, o.message_id, o.subject, o.tracking_token,
                      o.attempts, o.deadline, o.request, o.correlation_id, o.created_at, o.requested_at, o.reason,
                      o.detail, o.smtp_code, o.smtp_reply, o.deferred_recipients"""


async def claim(conn: asyncpg.Connection, ids: Sequence[UUID], worker_id: int, claim_id: UUID) -> list[asyncpg.Record]:
    """Mark pending requests `sending` for this worker (committed before any mail transaction), as
    claimed by ``claim_id`` (``unsettled_claims``)."""
    if not ids:
        return []
    return await conn.fetch(
        f"""UPDATE outbound_email o SET status = 'sending', attempts = attempts + 1, worker_id = $2,
                   next_attempt_at = NULL, started_at = NULL, claim_id = $3, updated_at = now()
            WHERE o.id = ANY($1::uuid[]) AND o.status = 'pending_send'
            RETURNING {_CLAIMED_COLUMNS}""",
        list(ids), worker_id, claim_id,
    )


async def claim_due(conn: asyncpg.Connection, mailbox_ids: Sequence[UUID], limit: int, worker_id: int,
                    claim_id: UUID) -> list[asyncpg.Record]:
    """Claim (as ``claim`` does) up to ``limit`` due requests of mailboxes known to be able to send,
    before their deadline, oldest first, skipping rows other workers hold: the common case in one statement.
    Which rows: ``outbound_due`` (migration 0017), which reads them in order whatever the statistics."""
    if not mailbox_ids or limit <= 0:
        return []
    return await conn.fetch(
        f"""UPDATE outbound_email o SET status = 'sending', attempts = attempts + 1, worker_id = $3,
                   next_attempt_at = NULL, started_at = NULL, claim_id = $4, updated_at = now()
            WHERE o.id = ANY(ARRAY(SELECT outbound_due($1::uuid[], $2::int)))
            RETURNING {_CLAIMED_COLUMNS}""",
        list(mailbox_ids), limit, worker_id, claim_id,
    )


async def unsettled_claims(conn: asyncpg.Connection, claim_ids: Sequence[UUID], worker_id: int) -> list[asyncpg.Record]:
    """The rows that transactions whose COMMIT was never confirmed (``claim_ids``) claimed for this
    worker, if they committed after all: still `sending`, never cleared to reach a transport."""
    if not claim_ids:
        return []
    return await conn.fetch(
        f"""SELECT {_CLAIMED_COLUMNS} FROM outbound_email o
            WHERE o.status = 'sending' AND o.worker_id = $2 AND o.claim_id = ANY($1::uuid[]) AND o.started_at IS NULL""",
        list(claim_ids), worker_id,
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
    deferred_recipients: list[str] | None = None   # with pending_send: the next attempt sends to these only


async def record_outcomes(conn: asyncpg.Connection, outcomes: Sequence[Outcome], worker_id: int | None,
                          *, from_status: str = "sending", activities: Sequence[SentActivity] = ()) -> dict[UUID, UUID | None]:
    """Write outcomes of rows this worker holds, and the outgoing activities of the sent ones, in one
    statement; returns the ids updated, each with its row's activity id.

    An activity is recorded once per Message-ID (linked to its mailbox); a sent row points at it,
    whether this statement or an earlier one recorded it.
    """
    if not outcomes:
        return {}
    for outcome in outcomes:   # server text goes into text columns and status events as it is cleaned here
        outcome.detail, outcome.smtp_reply = storable_text(outcome.detail), storable_text(outcome.smtp_reply)
    rows = await conn.fetch(
        """WITH a AS (
               SELECT * FROM unnest($11::uuid[], $12::uuid[], $13::text[], $14::text[], $15::text[], $16::text[],
                                    $17::text[], $18::text[], $19::text[], $20::uuid[], $21::text[], $22::text[], $23::text[],
                                    $24::uuid[], $25::uuid[])
                   AS a(id, org, mid, subject, norm, sender, to_list, cc_list, rkind, rid, token, root, preview, mailbox,
                        request)),
           created AS (
               -- A Message-ID already recorded keeps its activity: the no-op update makes RETURNING give
               -- its id too, so no second look-up (a join on email_activity) is needed.
               INSERT INTO email_activity (id, organization_id, message_id, direction, status, subject, normalized_subject,
                      from_address, to_addresses, cc_addresses, regarding_kind, regarding_id, tracking_token, thread_root,
                      preview, sent_at)
               SELECT DISTINCT ON (a.org, a.mid) a.id, a.org, a.mid, 'outgoing', 'sent', a.subject, a.norm, a.sender,
                      a.to_list::text[], a.cc_list::text[], a.rkind, a.rid, a.token, a.root, a.preview, now()
               FROM a
               ON CONFLICT (organization_id, message_id) DO UPDATE SET organization_id = EXCLUDED.organization_id
               RETURNING id, organization_id, message_id),
           found AS (
               SELECT c.id, a.mailbox, a.request FROM created c JOIN a ON a.org = c.organization_id AND a.mid = c.message_id),
           linked AS (
               INSERT INTO email_activity_mailbox (activity_id, mailbox_id)
               SELECT DISTINCT id, mailbox FROM found ON CONFLICT DO NOTHING)
           UPDATE outbound_email o SET status = u.status, transport = coalesce(u.transport, o.transport),
                  reason = u.reason, detail = u.detail, smtp_code = u.code, smtp_reply = u.reply,
                  next_attempt_at = u.next_at,
                  -- A retry keeps the recipients still owed (a later failure does not widen them).
                  deferred_recipients = CASE WHEN u.status = 'pending_send'
                                             THEN coalesce(u.deferred::text[], o.deferred_recipients) END,
                  activity_id = coalesce(CASE WHEN u.status = 'sent' THEN f.id END, o.activity_id),
                  sent_at = CASE WHEN u.status = 'sent' THEN now() ELSE o.sent_at END,
                  worker_id = NULL, updated_at = now()
           FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::text[],
                       $8::timestamptz[], $26::text[]) AS u(id, status, transport, reason, detail, code, reply, next_at,
                                                            deferred)
                LEFT JOIN found f ON f.request = u.id
           WHERE o.id = u.id AND o.status = $9 AND ($10::bigint IS NULL OR o.worker_id = $10)
           RETURNING o.id, o.activity_id""",
        [o.id for o in outcomes], [o.status for o in outcomes], [o.transport for o in outcomes],
        [o.reason for o in outcomes], [(o.detail or "")[:2000] or None for o in outcomes],
        [o.smtp_code for o in outcomes], [(o.smtp_reply or "")[:2000] or None for o in outcomes],
        [o.next_attempt_at for o in outcomes], from_status, worker_id,
        [r.id for r in activities], [r.organization_id for r in activities], [r.message_id for r in activities],
        [r.subject for r in activities], [r.normalized_subject for r in activities], [r.from_address for r in activities],
        [_pg_array(r.to) for r in activities], [_pg_array(r.cc) for r in activities],
        [r.regarding_kind for r in activities], [r.regarding_id for r in activities],
        [r.tracking_token for r in activities], [r.thread_root for r in activities], [r.preview for r in activities],
        [r.mailbox_id for r in activities], [r.request_id for r in activities],
        [_pg_array(o.deferred_recipients) if o.deferred_recipients else None for o in outcomes],
    )
    return {r["id"]: r["activity_id"] for r in rows}


# --------------------------------------------------------------------------- activities


@dataclass(frozen=True, slots=True)
class SentActivity:
    id: UUID
    request_id: UUID   # the ledger row it was sent for
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
        f"""SELECT {_CLAIMED_COLUMNS}, o.transport, o.started_at FROM outbound_email o
            WHERE o.status = 'sending' AND o.worker_id = $1 FOR UPDATE""",
        worker_id)


async def mark_started(conn: asyncpg.Connection, ids: Sequence[UUID], worker_id: int) -> set[UUID]:
    """Commit that these claimed rows may now reach their transport; returns those still this worker's
    and not cleared before (a row another worker took back after this one lost its lock must not be
    sent, nor a row cleared once be cleared again for a second send)."""
    rows = await conn.fetch(
        """UPDATE outbound_email SET started_at = now()
           WHERE id = ANY($1::uuid[]) AND status = 'sending' AND worker_id = $2 AND started_at IS NULL RETURNING id""",
        list(ids), worker_id)
    return {r["id"] for r in rows}


async def requeue_unstarted(conn: asyncpg.Connection, ids: Sequence[UUID], worker_id: int,
                            detail: str) -> list[asyncpg.Record]:
    """A dead worker's claimed rows that never reached a transport: pending again, due now, the
    attempt not counted; returns them (for their status events)."""
    if not ids:
        return []
    return await conn.fetch(
        """UPDATE outbound_email o SET status = 'pending_send', worker_id = NULL, attempts = greatest(attempts - 1, 0),
                  next_attempt_at = now(), reason = 'worker_stopped', detail = $3, updated_at = now()
           WHERE o.id = ANY($1::uuid[]) AND o.status = 'sending' AND o.worker_id = $2 AND o.started_at IS NULL
           RETURNING o.id, o.organization_id, o.idempotency_key, o.mailbox_id, o.message_id, o.attempts, o.correlation_id""",
        list(ids), worker_id, detail)
