"""Evaluate's SQL: the batch's mailbox contexts, one bulk query per lookup kind, the one transaction
that records activities, their mailboxes, every decision and the outbox events, and the link made
after it (``link_to_activities``).  (Held messages have their own: ``held.py``.)"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence
from uuid import UUID

import asyncpg

from services.evaluate.context import MailboxContext
from services.evaluate.lookups import LookupKeys, Lookups, Party, TrackedRef


async def mailbox_rows(conn: asyncpg.Connection, mailbox_ids: Sequence[UUID]) -> dict[UUID, asyncpg.Record]:
    rows = await conn.fetch(
        """SELECT m.id, m.organization_id, m.email, m.active, m.email_approved, m.incoming_status, m.tracking,
                  m.convert_to_activities, m.profile_id IS NOT NULL AS has_profile,
                  p.process_email_received_after AS received_after,
                  CASE WHEN m.owner_user_id IS NOT NULL THEN 'user' WHEN m.owner_queue_id IS NOT NULL THEN 'queue' END AS owner_kind,
                  coalesce(m.owner_user_id, m.owner_queue_id) AS owner_id,
                  coalesce(u.active, q.active, true) AS owner_active,
                  coalesce(u.incoming_method, q.incoming_method) AS owner_incoming_method,
                  o.correlation_order, o.tracking_token_enabled, o.tracking_token_prefix, o.tracking_token_digits, o.smart_matching,
                  o.smart_matching_min_recipients
           FROM mailbox m
           JOIN organization o ON o.id = m.organization_id
           LEFT JOIN email_server_profile p ON p.id = m.profile_id
           LEFT JOIN crm_user u ON u.id = m.owner_user_id
           LEFT JOIN queue q ON q.id = m.owner_queue_id
           WHERE m.id = ANY($1::uuid[])""",
        list(set(mailbox_ids)),
    )
    return {r["id"]: r for r in rows}


async def folder_regarding(conn: asyncpg.Connection,
                           folders: Sequence[tuple[UUID, str]]) -> dict[tuple[UUID, str], tuple[str, str]]:
    """The record each (mailbox, folder) of a batch is mapped to by a folder-level tracking rule, in
    one query for the batch; folders without a rule are missing from the answer."""
    if not folders:
        return {}
    rows = await conn.fetch(
        """SELECT f.mailbox_id, f.folder, f.regarding_kind, f.regarding_id FROM folder_tracking_rule f
           JOIN unnest($1::uuid[], $2::text[]) AS k(mailbox_id, folder) ON f.mailbox_id = k.mailbox_id AND f.folder = k.folder""",
        [m for m, _ in folders], [f for _, f in folders],
    )
    return {(r["mailbox_id"], r["folder"]): (r["regarding_kind"], str(r["regarding_id"])) for r in rows}


def mailbox_context(row: asyncpg.Record, *, forwarded: bool, holds_messages: bool = False) -> MailboxContext:
    """A ``mailbox_rows`` row as the rules see it; ``forwarded``: for a message the mailbox's owner
    forwarded through a forward mailbox."""
    if forwarded:
        # Reached through the forward mailbox: the forwarder's own mailbox holds the options; it is
        # not polled itself, so its incoming status does not apply.
        incoming_enabled = row["owner_incoming_method"] == "forward_mailbox"
    else:
        incoming_enabled = row["incoming_status"] == "success" and (
            row["owner_kind"] is None or row["owner_incoming_method"] == "server_side_sync")
    return MailboxContext(
        mailbox_id=str(row["id"]), owner_kind=row["owner_kind"], owner_id=str(row["owner_id"]) if row["owner_id"] else None,
        owner_email=row["email"], active=row["active"] and row["owner_active"], has_profile=row["has_profile"] or forwarded,
        approved=row["email_approved"], incoming_enabled=incoming_enabled, tracking=row["tracking"],
        convert=row["convert_to_activities"], received_after=row["received_after"], holds_messages=holds_messages,
    )


async def forwarders(conn: asyncpg.Connection, org_id: UUID, addresses: Sequence[str]) -> dict[str, asyncpg.Record]:
    """Users and queues whose incoming method is forward mailbox, by address, with their mailbox."""
    rows = await conn.fetch(
        """SELECT lower(o.email) AS email, o.active, o.incoming_method, m.id AS mailbox_id
           FROM (SELECT id, email, active, incoming_method, 'user' AS kind FROM crm_user WHERE organization_id = $1
                 UNION ALL
                 SELECT id, email, active, incoming_method, 'queue' FROM queue WHERE organization_id = $1) o
           LEFT JOIN mailbox m ON m.owner_user_id = o.id OR m.owner_queue_id = o.id
           WHERE lower(o.email) = ANY($2::text[])""",
        org_id, [a.lower() for a in addresses],
    )
    return {r["email"]: r for r in rows}


def _ref(row: asyncpg.Record) -> TrackedRef:
    participants = {a for a in (row["to_addresses"] or [])} | {a for a in (row["cc_addresses"] or [])}
    if row["from_address"]:
        participants.add(row["from_address"])
    return TrackedRef(str(row["id"]), row["regarding_kind"], str(row["regarding_id"]) if row["regarding_id"] else None,
                      row["subject"], frozenset(participants))


_TRACKED_COLUMNS = "id, message_id, regarding_kind, regarding_id, subject, from_address, to_addresses, cc_addresses, tracking_token, thread_root, normalized_subject"


async def load_lookups(conn: asyncpg.Connection, org_id: UUID, keys: LookupKeys, *,
                       send_wait_seconds: float = 0.0) -> Lookups:
    """What the registry says about a batch's keys.  ``send_wait_seconds``: how long after a send of
    Conduit's was cleared to reach its server a copy of it waits for the send to be recorded."""
    lookups = Lookups()
    if keys.addresses:
        for r in await conn.fetch(
            # Ordered as the reference resolves a sender shared by several records (its first only:
            # ``context.resolve_parties``): users, contacts, accounts, leads, then email-enabled
            # tables such as queues; within a kind the oldest record first.  Every time the same way.
            """SELECT kind, id, email, email_enabled FROM (
                 SELECT 'user' AS kind, id, lower(email) AS email, true AS email_enabled, 0 AS rank, created_at FROM crm_user
                   WHERE organization_id = $1 AND lower(email) = ANY($2::text[])
                 UNION ALL
                 SELECT 'queue', id, lower(email), true, 4, created_at FROM queue
                   WHERE organization_id = $1 AND lower(email) = ANY($2::text[])
                 UNION ALL
                 SELECT kind, id, lower(email), email_enabled, CASE kind WHEN 'contact' THEN 1 WHEN 'account' THEN 2 ELSE 3 END,
                        created_at FROM crm_record WHERE organization_id = $1 AND lower(email) = ANY($2::text[])) p
               ORDER BY rank, created_at, id""",
            org_id, list(keys.addresses),
        ):
            party = Party(r["kind"], str(r["id"]), r["email"], r["email_enabled"])
            lookups.parties_by_address[r["email"]] = lookups.parties_by_address.get(r["email"], ()) + (party,)
    if keys.message_ids:
        for r in await conn.fetch(
            f"SELECT {_TRACKED_COLUMNS} FROM email_activity WHERE organization_id = $1 AND message_id = ANY($2::text[])",
            org_id, list(keys.message_ids),
        ):
            lookups.tracked_by_message_id[r["message_id"]] = _ref(r)
    if keys.own_message_ids and send_wait_seconds > 0:
        # `started_at`: dispatch commits it just before it hands the request to its transport, so a
        # copy cannot exist before it.  Not `pending_send`: a request sent to some recipients and
        # owed to others (4xx to RCPT) may wait hours; its copies are evaluated as they come.
        for r in await conn.fetch(
            """SELECT message_id, idempotency_key FROM outbound_email
               WHERE organization_id = $1 AND message_id = ANY($2::text[]) AND status = 'sending'
                 AND started_at > now() - make_interval(secs => $3::float8)""",
            org_id, list(keys.own_message_ids), send_wait_seconds,
        ):
            lookups.being_sent[r["message_id"]] = r["idempotency_key"]
    if keys.tracking_tokens:
        for r in await conn.fetch(
            # The email Conduit sent with the token first: another sender's mail that carried the same
            # text in its subject earlier (another CRM's default "CRM:" prefix, a guessed number) must
            # not take the replies to ours.  Then the most recent, as the reference looks it up.
            f"""SELECT DISTINCT ON (tracking_token) {_TRACKED_COLUMNS} FROM email_activity
                WHERE organization_id = $1 AND tracking_token = ANY($2::text[])
                ORDER BY tracking_token, direction = 'outgoing' DESC, created_at DESC""",
            org_id, list(keys.tracking_tokens),
        ):
            lookups.tracked_by_token[r["tracking_token"]] = _ref(r)
    if keys.thread_roots:
        for r in await conn.fetch(
            f"""SELECT DISTINCT ON (thread_root) {_TRACKED_COLUMNS} FROM email_activity
                WHERE organization_id = $1 AND thread_root = ANY($2::text[]) ORDER BY thread_root, created_at DESC""",
            org_id, list(keys.thread_roots),
        ):
            lookups.tracked_by_thread_root[r["thread_root"]] = _ref(r)
    if keys.normalized_subjects:
        for r in await conn.fetch(
            f"""SELECT {_TRACKED_COLUMNS} FROM (SELECT *, row_number() OVER (PARTITION BY normalized_subject ORDER BY created_at DESC) AS n
                FROM email_activity WHERE organization_id = $1 AND normalized_subject = ANY($2::text[])) s WHERE n <= 20
                ORDER BY s.created_at DESC""",
            org_id, list(keys.normalized_subjects),
        ):
            subject = r["normalized_subject"]
            lookups.tracked_by_subject[subject] = lookups.tracked_by_subject.get(subject, ()) + (_ref(r),)
    return lookups


@dataclass
class ActivityRow:
    id: UUID
    organization_id: UUID
    message_id: str
    direction: str
    subject: str
    normalized_subject: str
    from_address: str | None
    to_addresses: list[str]
    cc_addresses: list[str]
    parties: list[dict[str, Any]]
    regarding_kind: str | None
    regarding_id: UUID | None
    tracking_token: str | None
    thread_root: str | None
    correlated_by: str | None
    raw_sha256: str
    preview: str
    regarding_at: datetime | None = None   # a folder rule's filing: when its event was published
    correlated_activity_id: UUID | None = None   # the activity it was correlated to (the email it answers)


@dataclass
class DecisionRow:
    organization_id: UUID
    mailbox_id: UUID
    message_id: str
    tracked: bool
    rule: str
    reason: str
    explanation: str
    subject: str
    from_address: str | None
    held: bool = False
    event_at: datetime | None = None   # when the event it was made from was published


async def insert_activities(conn: asyncpg.Connection, rows: Sequence[ActivityRow]) -> tuple[dict[tuple[UUID, str], UUID], set[UUID]]:
    """Insert new activities (one per Message-ID per organization); return the id of every
    (organization, message id) of the batch, new or already there, and the ids inserted now.

    A row correlated to another row of ``rows`` (a reply in the batch of the email it answers) names
    that row's id, which is the activity's only if this insert made it: another replica may have
    recorded that email first, under its own id.  Such a reference is written once the ids are known
    (a second statement, in batches that have one), and the row's ``correlated_activity_id`` is set
    to the id written."""
    if not rows:
        return {}, set()
    batch = {r.id: r for r in rows}
    answering = {r.id: batch[c] for r in rows if (c := r.correlated_activity_id) is not None and c in batch}
    # Arrays of arrays must be rectangular in PostgreSQL, so each address list travels as one
    # unit-separator-joined string (addresses never contain \x1f).
    inserted = await conn.fetch(
        """INSERT INTO email_activity (id, organization_id, message_id, direction, status, subject, normalized_subject,
               from_address, to_addresses, cc_addresses, parties, regarding_kind, regarding_id, tracking_token,
               thread_root, correlated_by, raw_sha256, preview, regarding_at, correlated_activity_id)
           SELECT t.id, t.org, t.mid, t.dir, CASE WHEN t.dir = 'outgoing' THEN 'sent' ELSE 'received' END, t.subj, t.nsubj,
                  t.frm, string_to_array(t.tos, E'\\x1f'), string_to_array(t.ccs, E'\\x1f'),
                  t.parties::jsonb, t.rk, t.rid, t.tok, t.root, t.corr, t.sha, t.preview, t.rat, t.cid
           FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                       $9::text[], $10::text[], $11::text[], $12::uuid[], $13::text[], $14::text[], $15::text[], $16::text[], $17::text[],
                       $18::timestamptz[], $19::uuid[])
                AS t(id, org, mid, dir, subj, nsubj, frm, tos, ccs, parties, rk, rid, tok, root, corr, sha, preview, rat, cid)
           ON CONFLICT (organization_id, message_id) DO NOTHING
           RETURNING id, organization_id, message_id""",
        [r.id for r in rows], [r.organization_id for r in rows], [r.message_id for r in rows], [r.direction for r in rows],
        [r.subject for r in rows], [r.normalized_subject for r in rows], [r.from_address for r in rows],
        ["\x1f".join(r.to_addresses) for r in rows], ["\x1f".join(r.cc_addresses) for r in rows], [json.dumps(r.parties) for r in rows],
        [r.regarding_kind for r in rows], [r.regarding_id for r in rows], [r.tracking_token for r in rows],
        [r.thread_root for r in rows], [r.correlated_by for r in rows], [r.raw_sha256 for r in rows], [r.preview for r in rows],
        [r.regarding_at for r in rows],
        [None if r.id in answering else r.correlated_activity_id for r in rows],
    )
    ids = {(r["organization_id"], r["message_id"]): r["id"] for r in inserted}
    missing = [r for r in rows if (r.organization_id, r.message_id) not in ids]
    if missing:
        for r in await conn.fetch(
            """SELECT a.id, a.organization_id, a.message_id FROM email_activity a
               JOIN unnest($1::uuid[], $2::text[]) AS k(org, mid) ON a.organization_id = k.org AND a.message_id = k.mid""",
            [r.organization_id for r in missing], [r.message_id for r in missing],
        ):
            ids[(r["organization_id"], r["message_id"])] = r["id"]
    created = {r["id"] for r in inserted}
    replies = [batch[i] for i in answering if i in created]
    if replies:
        for r in replies:
            answered = answering[r.id]
            r.correlated_activity_id = ids.get((answered.organization_id, answered.message_id))
        await conn.execute(
            """UPDATE email_activity a SET correlated_activity_id = t.cid
               FROM unnest($1::uuid[], $2::uuid[]) AS t(id, cid) WHERE a.id = t.id""",
            [r.id for r in replies], [r.correlated_activity_id for r in replies],
        )
    return ids, created


async def link_mailboxes(conn: asyncpg.Connection, links: Sequence[tuple[UUID, UUID]]) -> None:
    if links:
        await conn.execute(
            """INSERT INTO email_activity_mailbox (activity_id, mailbox_id)
               SELECT * FROM unnest($1::uuid[], $2::uuid[]) ON CONFLICT DO NOTHING""",
            [a for a, _ in links], [m for _, m in links],
        )


async def link_to_activities(conn: asyncpg.Connection, messages: Sequence[tuple[UUID, str]],
                             option_rules: Sequence[str]) -> int:
    """Of these (organization, Message-ID) pairs, the decisions a tracking option's rule made "not
    tracked" as the message was becoming an activity through another mailbox (decided no earlier than
    ``_AT_ONCE`` before the activity was made) become *already tracked*, linked to it; returns how
    many.  Two replicas evaluate one message for two mailboxes at once (its events are keyed by
    mailbox), and neither saw the other's activity when it decided; or one batch held both and
    decided the other mailbox first.  Run after each batch's commit, so of two such batches the later
    check sees both: mail that reaches several mailboxes together is one activity linked to each,
    whichever is decided first.  An older decision stands (first decision wins): a queue that kept a
    message it did not track must not delete it days later because someone else tracked it."""
    if not messages:
        return 0
    async with conn.transaction():
        rows = await conn.fetch(
            f"""UPDATE email_decision d
               SET tracked = true, rule = 'already_tracked', reason = 'already_tracked', activity_id = a.id, decided_at = now(),
                   explanation = 'Tracked: this message (Message-ID <' || d.message_id || '>) is already the email activity '
                                 || a.id || ', made through another mailbox as this one was evaluated.'
               FROM unnest($1::uuid[], $2::text[]) AS k(org, mid)
               JOIN email_activity a ON a.organization_id = k.org AND a.message_id = k.mid
               WHERE d.organization_id = k.org AND d.message_id = k.mid
                 AND NOT d.tracked AND NOT d.held AND d.rule = ANY($3::text[])
                 AND d.decided_at >= a.created_at - interval '{_AT_ONCE}'
               RETURNING d.mailbox_id, a.id AS activity_id""",
            [org for org, _ in messages], [mid for _, mid in messages], list(option_rules),
        )
        await link_mailboxes(conn, [(r["activity_id"], r["mailbox_id"]) for r in rows])
    return len(rows)


# How far apart a decision and an activity's creation count as "together" for ``link_to_activities``:
# longer than a batch takes to decide and commit, far shorter than mail that arrives another day.
_AT_ONCE = "1 minute"


@dataclass(frozen=True)
class Refiled:
    """An activity whose regarding record a folder-level tracking rule changed."""

    activity_id: UUID
    organization_id: UUID
    message_id: str
    regarding: tuple[str, UUID]
    previous: tuple[str, UUID] | None


async def set_regarding(conn: asyncpg.Connection, changes: Sequence[tuple[UUID, str, UUID, datetime]]) -> list[Refiled]:
    """File activities under a folder rule's record ((activity, kind, record id, when the rule's event
    was published)): only where that event is newer than the filing the activity has (or it has
    none), so an old event handled late never files it back; return the activities whose regarding
    record changed, with what they regarded before."""
    latest: dict[UUID, tuple[str, UUID, datetime]] = {}
    for activity_id, kind, record_id, at in changes:
        if activity_id not in latest or at > latest[activity_id][2]:
            latest[activity_id] = (kind, record_id, at)
    if not latest:
        return []
    rows = await conn.fetch(
        """WITH t AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::timestamptz[]) AS t(id, kind, rid, at)),
                before AS (SELECT a.id, a.regarding_kind, a.regarding_id FROM email_activity a JOIN t ON t.id = a.id
                           WHERE a.regarding_at IS NULL OR t.at > a.regarding_at FOR UPDATE OF a)
           UPDATE email_activity a SET regarding_kind = t.kind, regarding_id = t.rid, regarding_at = t.at
           FROM t JOIN before b ON b.id = t.id WHERE a.id = t.id AND (a.regarding_at IS NULL OR t.at > a.regarding_at)
           RETURNING a.id, a.organization_id, a.message_id, a.regarding_kind, a.regarding_id,
                     b.regarding_kind AS previous_kind, b.regarding_id AS previous_id""",
        list(latest), [k for k, _, _ in latest.values()], [r for _, r, _ in latest.values()],
        [at for _, _, at in latest.values()],
    )
    return [Refiled(r["id"], r["organization_id"], r["message_id"], (r["regarding_kind"], r["regarding_id"]),
                    (r["previous_kind"], r["previous_id"]) if r["previous_kind"] and r["previous_id"] else None)
            for r in rows
            if (r["previous_kind"], r["previous_id"]) != (r["regarding_kind"], r["regarding_id"])]


async def record_decisions(conn: asyncpg.Connection, rows: Sequence[DecisionRow], activity_ids: Sequence[UUID | None]) -> None:
    """First decision wins: a redelivered message does not rewrite history.  A held decision is no
    decision yet: the final one replaces it, and holding again keeps when it was first held.  A
    folder-level tracking rule's decision replaces another one made from an older event: the message
    was moved into a mapped folder after it was decided (the rule's record, named in the explanation,
    is what changes); an older event handled late replaces nothing."""
    # One row per key: an upsert may not touch a row twice in one statement.  Within the batch too,
    # the first final decision wins over a held one, and a folder rule's from a newer event over both.
    chosen: dict[tuple[UUID, str], int] = {}
    for i, r in enumerate(rows):
        first = chosen.get((r.mailbox_id, r.message_id))
        if first is None or not r.held and (rows[first].held or r.rule == "folder_tracking" and (
                rows[first].event_at is None or r.event_at is not None and r.event_at > rows[first].event_at)):
            chosen[(r.mailbox_id, r.message_id)] = i
    if len(chosen) < len(rows):
        keep = sorted(chosen.values())
        rows, activity_ids = [rows[i] for i in keep], [activity_ids[i] for i in keep]
    if rows:
        await conn.execute(
            """INSERT INTO email_decision (organization_id, mailbox_id, message_id, tracked, rule, reason, explanation,
                                          activity_id, subject, from_address, held, event_at)
               SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bool[], $5::text[], $6::text[], $7::text[],
                                    $8::uuid[], $9::text[], $10::text[], $11::bool[], $12::timestamptz[])
               ON CONFLICT (mailbox_id, message_id) DO UPDATE
                   SET tracked = excluded.tracked, rule = excluded.rule, reason = excluded.reason,
                       explanation = excluded.explanation, activity_id = excluded.activity_id, held = excluded.held,
                       event_at = excluded.event_at,
                       decided_at = CASE WHEN excluded.held THEN email_decision.decided_at ELSE now() END
                   WHERE email_decision.held OR (excluded.rule = 'folder_tracking' AND NOT excluded.held
                         AND (email_decision.event_at IS NULL OR excluded.event_at > email_decision.event_at)
                         AND (email_decision.rule, email_decision.explanation, email_decision.activity_id)
                             IS DISTINCT FROM (excluded.rule, excluded.explanation, excluded.activity_id))""",
            [r.organization_id for r in rows], [r.mailbox_id for r in rows], [r.message_id for r in rows],
            [r.tracked for r in rows], [r.rule for r in rows], [r.reason for r in rows], [r.explanation for r in rows],
            list(activity_ids), [r.subject[:1000] for r in rows], [r.from_address for r in rows], [r.held for r in rows],
            [r.event_at for r in rows],
        )
