"""All registry SQL.  Functions take a connection so callers choose the transaction."""
from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

DIRECTIONS = ("incoming", "outgoing", "act")

_MAILBOX_SELECT = """
SELECT m.*, p.name AS profile_name,
       CASE WHEN m.owner_user_id IS NOT NULL THEN 'user'
            WHEN m.owner_queue_id IS NOT NULL THEN 'queue' END AS owner_kind,
       coalesce(m.owner_user_id, m.owner_queue_id) AS owner_id
FROM mailbox m LEFT JOIN email_server_profile p ON p.id = m.profile_id
"""


async def organization_by_name(conn: asyncpg.Connection, name: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM organization WHERE name = $1", name)


async def organization_by_id(conn: asyncpg.Connection, org_id: UUID) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM organization WHERE id = $1", org_id)


async def insert_organization(conn: asyncpg.Connection, name: str) -> asyncpg.Record:
    return await conn.fetchrow(
        "INSERT INTO organization (name) VALUES ($1) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING *",
        name,
    )


async def update_organization(conn: asyncpg.Connection, org_id: UUID, fields: dict[str, Any]) -> asyncpg.Record:
    return await _update(conn, "organization", org_id, fields)


# --- profiles -------------------------------------------------------------------------------------

async def insert_profile(conn: asyncpg.Connection, fields: dict[str, Any]) -> asyncpg.Record:
    columns = ", ".join(fields)
    params = ", ".join(f"${i}" for i in range(1, len(fields) + 1))
    return await conn.fetchrow(
        f"INSERT INTO email_server_profile ({columns}) VALUES ({params}) RETURNING *", *fields.values()
    )


async def update_profile(conn: asyncpg.Connection, profile_id: UUID, fields: dict[str, Any]) -> asyncpg.Record:
    return await _update(conn, "email_server_profile", profile_id, {**fields, "updated_at": datetime.now().astimezone()})


async def profiles(conn: asyncpg.Connection, org_id: UUID) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM email_server_profile WHERE organization_id = $1 ORDER BY name", org_id)


async def profile_by_name_or_id(conn: asyncpg.Connection, org_id: UUID, ref: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM email_server_profile WHERE organization_id = $1 AND (name = $2 OR id::text = $2)", org_id, ref
    )


async def lock_profile(conn: asyncpg.Connection, profile_id: UUID) -> asyncpg.Record:
    """The profile's row, locked until the transaction ends: an edit checks what it will change."""
    return await conn.fetchrow("SELECT * FROM email_server_profile WHERE id = $1 FOR UPDATE", profile_id)


async def profile_by_id(conn: asyncpg.Connection, profile_id: UUID) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM email_server_profile WHERE id = $1", profile_id)


async def default_profile(conn: asyncpg.Connection, org_id: UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM email_server_profile WHERE organization_id = $1 AND is_default", org_id
    )


async def set_default_profile(conn: asyncpg.Connection, org_id: UUID, profile_id: UUID) -> None:
    # Clear first: the partial unique index allows one default at a time.
    await conn.execute(
        "UPDATE email_server_profile SET is_default = false, updated_at = now() WHERE organization_id = $1 AND is_default AND id <> $2",
        org_id, profile_id,
    )
    await conn.execute("UPDATE email_server_profile SET is_default = true, updated_at = now() WHERE id = $1", profile_id)


async def link_profileless_mailboxes(conn: asyncpg.Connection, org_id: UUID, profile_id: UUID) -> list[UUID]:
    """Mailboxes created while there was no default profile get it once there is one."""
    rows = await conn.fetch(
        "UPDATE mailbox SET profile_id = $2, updated_at = now() WHERE organization_id = $1 AND profile_id IS NULL RETURNING id",
        org_id, profile_id,
    )
    return [r["id"] for r in rows]


# --- users, queues, records ------------------------------------------------------------------------

async def insert_user(conn: asyncpg.Connection, org_id: UUID, full_name: str, email: str,
                      incoming: str, outgoing: str, act: str) -> asyncpg.Record:
    return await conn.fetchrow(
        """INSERT INTO crm_user (organization_id, full_name, email, incoming_method, outgoing_method, act_method)
           VALUES ($1, $2, $3, $4, $5, $6) RETURNING *""",
        org_id, full_name, email, incoming, outgoing, act,
    )


async def users(conn: asyncpg.Connection, org_id: UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT u.*, m.id AS mailbox_id FROM crm_user u LEFT JOIN mailbox m ON m.owner_user_id = u.id
           WHERE u.organization_id = $1 ORDER BY u.email""",
        org_id,
    )


async def insert_queue(conn: asyncpg.Connection, org_id: UUID, name: str, email: str,
                       incoming: str, outgoing: str) -> asyncpg.Record:
    return await conn.fetchrow(
        """INSERT INTO queue (organization_id, name, email, incoming_method, outgoing_method)
           VALUES ($1, $2, $3, $4, $5) RETURNING *""",
        org_id, name, email, incoming, outgoing,
    )


async def queues(conn: asyncpg.Connection, org_id: UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT q.*, m.id AS mailbox_id FROM queue q LEFT JOIN mailbox m ON m.owner_queue_id = q.id
           WHERE q.organization_id = $1 ORDER BY q.name""",
        org_id,
    )


# A user's or a queue's table, and the mailbox column that names it as owner.
_OWNER_TABLES = {"user": ("crm_user", "owner_user_id"), "queue": ("queue", "owner_queue_id")}


async def lock_owner(conn: asyncpg.Connection, kind: str, org_id: UUID, ref: str) -> asyncpg.Record | None:
    """A user (by id or address) or a queue (by id, address or name), its row locked until the
    transaction ends: an edit checks what it will change.  An address match comes first."""
    table, _ = _OWNER_TABLES[kind]
    by_name = " OR name = $2" if kind == "queue" else ""
    return await conn.fetchrow(
        f"""SELECT * FROM {table} WHERE organization_id = $1 AND (id::text = lower($2) OR lower(email) = lower($2){by_name})
            ORDER BY lower(email) = lower($2) DESC LIMIT 1 FOR UPDATE""",
        org_id, ref,
    )


async def owner_by_id(conn: asyncpg.Connection, kind: str, owner_id: UUID) -> asyncpg.Record | None:
    """A user or a queue with its mailbox's id (None: it has none), as ``users`` and ``queues`` list them."""
    table, column = _OWNER_TABLES[kind]
    return await conn.fetchrow(
        f"SELECT o.*, m.id AS mailbox_id FROM {table} o LEFT JOIN mailbox m ON m.{column} = o.id WHERE o.id = $1",
        owner_id,
    )


async def owner_with_address(conn: asyncpg.Connection, kind: str, org_id: UUID, email: str) -> asyncpg.Record | None:
    table, _ = _OWNER_TABLES[kind]
    return await conn.fetchrow(
        f"SELECT * FROM {table} WHERE organization_id = $1 AND lower(email) = lower($2) LIMIT 1", org_id, email,
    )


async def update_owner(conn: asyncpg.Connection, kind: str, owner_id: UUID, fields: dict[str, Any]) -> asyncpg.Record:
    return await _update(conn, _OWNER_TABLES[kind][0], owner_id, fields)


async def lock_owners_mailbox(conn: asyncpg.Connection, kind: str, owner_id: UUID) -> asyncpg.Record | None:
    """The mailbox of a user or a queue (None: it has none), its row locked until the transaction ends."""
    _, column = _OWNER_TABLES[kind]
    mailbox_id = await conn.fetchval(f"SELECT id FROM mailbox WHERE {column} = $1 FOR UPDATE", owner_id)
    return None if mailbox_id is None else await mailbox_by_id(conn, mailbox_id)


async def insert_record(conn: asyncpg.Connection, org_id: UUID, kind: str, name: str, email: str,
                        email_enabled: bool) -> asyncpg.Record:
    return await conn.fetchrow(
        """INSERT INTO crm_record (organization_id, kind, name, email, email_enabled)
           VALUES ($1, $2, $3, $4, $5) RETURNING *""",
        org_id, kind, name, email, email_enabled,
    )


async def records_with_address(conn: asyncpg.Connection, org_id: UUID, email: str) -> list[asyncpg.Record]:
    """The contacts, accounts and leads of the organization with this address (any case), oldest first.
    Taken under a transaction-long advisory lock on the address, so two concurrent ``record add`` of
    one address see each other (the table has no unique index on it: kinds may share an address)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"crm_record:{org_id}:{email.lower()}")
    return await conn.fetch(
        "SELECT * FROM crm_record WHERE organization_id = $1 AND lower(email) = lower($2) ORDER BY created_at, id",
        org_id, email,
    )


async def parties_with_address(conn: asyncpg.Connection, org_id: UUID, email: str) -> list[asyncpg.Record]:
    """The users, contacts, accounts, leads and queues with this address (any case), in the order
    evaluate resolves a sender shared by several (services/evaluate/repository.py ``load_lookups``:
    its first wins): users, contacts, accounts, leads, then queues, the oldest first within a kind."""
    return await conn.fetch(
        """SELECT kind, id, name FROM (
             SELECT 'user' AS kind, id, full_name AS name, 0 AS rank, created_at FROM crm_user
               WHERE organization_id = $1 AND lower(email) = lower($2)
             UNION ALL
             SELECT 'queue', id, name, 4, created_at FROM queue WHERE organization_id = $1 AND lower(email) = lower($2)
             UNION ALL
             SELECT kind, id, name, CASE kind WHEN 'contact' THEN 1 WHEN 'account' THEN 2 ELSE 3 END, created_at
               FROM crm_record WHERE organization_id = $1 AND lower(email) = lower($2)) p
           ORDER BY rank, created_at, id""",
        org_id, email,
    )


async def records_by_ref(conn: asyncpg.Connection, org_id: UUID, kind: str, ref: str) -> list[asyncpg.Record]:
    """Records of ``kind`` in the organization whose id or address is ``ref``."""
    return await conn.fetch(
        """SELECT * FROM crm_record WHERE organization_id = $1 AND kind = $2
             AND (id::text = lower($3) OR lower(email) = lower($3)) ORDER BY created_at, id""",
        org_id, kind, ref,
    )


async def records(conn: asyncpg.Connection, org_id: UUID, kind: str | None = None) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM crm_record WHERE organization_id = $1 AND ($2::text IS NULL OR kind = $2) ORDER BY kind, email",
        org_id, kind,
    )


# --- mailboxes ---------------------------------------------------------------------------------------

async def insert_mailbox(conn: asyncpg.Connection, fields: dict[str, Any]) -> asyncpg.Record:
    columns = ", ".join(fields)
    params = ", ".join(f"${i}" for i in range(1, len(fields) + 1))
    row = await conn.fetchrow(f"INSERT INTO mailbox ({columns}) VALUES ({params}) RETURNING id", *fields.values())
    return await mailbox_by_id(conn, row["id"])


async def mailbox_by_id(conn: asyncpg.Connection, mailbox_id: UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(_MAILBOX_SELECT + " WHERE m.id = $1", mailbox_id)


async def mailbox_by_ref(conn: asyncpg.Connection, org_id: UUID, ref: str) -> asyncpg.Record | None:
    """A mailbox by id, by its email address, or by its owner's email address."""
    return await conn.fetchrow(
        _MAILBOX_SELECT
        + """ WHERE m.organization_id = $1 AND (m.id::text = $2 OR lower(m.email) = lower($2)
              OR m.owner_user_id = (SELECT id FROM crm_user WHERE organization_id = $1 AND lower(email) = lower($2))
              OR m.owner_queue_id = (SELECT id FROM queue WHERE organization_id = $1 AND lower(email) = lower($2)))
              LIMIT 1""",
        org_id, ref,
    )


async def mailbox_with_address(conn: asyncpg.Connection, org_id: UUID, email: str) -> asyncpg.Record | None:
    """The organization's mailbox whose own address is ``email`` (any case)."""
    return await conn.fetchrow(_MAILBOX_SELECT + " WHERE m.organization_id = $1 AND lower(m.email) = lower($2)", org_id, email)


async def lock_mailbox(conn: asyncpg.Connection, mailbox_id: UUID) -> asyncpg.Record:
    """The mailbox, its row locked until the transaction ends: an edit of its lists reads them fresh."""
    await conn.execute("SELECT 1 FROM mailbox WHERE id = $1 FOR UPDATE", mailbox_id)
    return await mailbox_by_id(conn, mailbox_id)


async def mailboxes(conn: asyncpg.Connection, org_id: UUID) -> list[asyncpg.Record]:
    return await conn.fetch(_MAILBOX_SELECT + " WHERE m.organization_id = $1 ORDER BY m.email", org_id)


async def update_mailbox(conn: asyncpg.Connection, mailbox_id: UUID, fields: dict[str, Any]) -> asyncpg.Record:
    await _update(conn, "mailbox", mailbox_id, {**fields, "updated_at": datetime.now().astimezone()})
    return await mailbox_by_id(conn, mailbox_id)


async def reset_tests(conn: asyncpg.Connection, mailbox_id: UUID, directions: list[str], message: str) -> None:
    """Forget Test & Enable's results (and the failures counted since) for ``directions``: the
    mailbox no longer reaches the server they were recorded against."""
    for direction in directions:
        _check_direction(direction)
    if directions:
        await _update(conn, "mailbox", mailbox_id, {
            **{f"{d}_status": "not_run" for d in directions}, **{f"{d}_tested_at": None for d in directions},
            **{f"{d}_test_message": message for d in directions}, **{f"{d}_error_count": 0 for d in directions},
            **{f"{d}_backoff_until": None for d in directions}, **{f"{d}_refused_logins": 0 for d in directions},
            **{f"{d}_stopped_at": None for d in directions}, "updated_at": datetime.now().astimezone()})


async def retry_with_new_settings(conn: asyncpg.Connection, *, directions: list[str], mailbox_id: UUID | None = None,
                                  profile_id: UUID | None = None) -> list[asyncpg.Record]:
    """The server or the credentials of ``directions`` changed, for one mailbox or for every mailbox
    on a profile: what the old ones earned no longer holds the mailboxes back.  Their refused sign-ins
    are counted afresh and a back-off ends now, so the next registry refresh tries the new settings;
    requests to send that waited for that back-off (``outbound_email`` rows postponed to its end, or
    sooner) come due with it.  The error count stays (the first success then records the recovery),
    and a direction stopped after refused sign-ins stays stopped until Test & Enable.

    Returns, for each mailbox changed: ``id``, ``organization_id`` and ``backed_off``, the directions
    whose back-off was running (and not stopped) until now."""
    for direction in directions:
        _check_direction(direction)
    if not directions:
        return []
    assignments = ", ".join(f"{d}_refused_logins = 0, {d}_backoff_until = NULL" for d in directions)
    changed = " OR ".join(f"{d}_refused_logins <> 0 OR {d}_backoff_until IS NOT NULL" for d in directions)
    old = ", ".join(f"{d}_backoff_until, {d}_stopped_at" for d in directions)
    waited = ", ".join(f"CASE WHEN old.{d}_backoff_until > now() AND old.{d}_stopped_at IS NULL THEN '{d}' END"
                       for d in directions)
    until = "old.outgoing_backoff_until" if "outgoing" in directions else "NULL::timestamptz"
    rows = await conn.fetch(
        f"""UPDATE mailbox m SET {assignments}, updated_at = now()
            FROM (SELECT id, {old} FROM mailbox
                  WHERE ($1::uuid IS NULL OR id = $1) AND ($2::uuid IS NULL OR profile_id = $2) AND ({changed})
                  ORDER BY id FOR UPDATE) old
            WHERE m.id = old.id
            RETURNING m.id, m.organization_id, array_remove(ARRAY[{waited}]::text[], NULL) AS backed_off,
                      {until} AS outgoing_backoff_until""",
        mailbox_id, profile_id,
    )
    waiting = [(r["id"], r["outgoing_backoff_until"]) for r in rows if "outgoing" in r["backed_off"]]
    if waiting:
        # Dispatch postpones a backed-off mailbox's requests to the back-off's end: they are due now.
        await conn.execute(
            """UPDATE outbound_email o SET next_attempt_at = now(), updated_at = now()
               FROM unnest($1::uuid[], $2::timestamptz[]) AS w(mailbox_id, until)
               WHERE o.mailbox_id = w.mailbox_id AND o.status = 'pending_send'
                 AND o.next_attempt_at > now() AND o.next_attempt_at <= w.until""",
            [w[0] for w in waiting], [w[1] for w in waiting],
        )
    return rows


# --- folder-level tracking rules ----------------------------------------------------------------------

_FOLDER_RULE_SELECT = """
SELECT f.mailbox_id, f.folder, f.folder_id, f.regarding_kind, f.regarding_id, f.created_at,
       f.onboarded_at, f.onboarded_uid, r.name AS regarding_name, r.email AS regarding_email
FROM folder_tracking_rule f JOIN crm_record r ON r.id = f.regarding_id
"""


async def folder_rules(conn: asyncpg.Connection, mailbox_id: UUID) -> list[asyncpg.Record]:
    return await conn.fetch(_FOLDER_RULE_SELECT + " WHERE f.mailbox_id = $1 ORDER BY f.folder", mailbox_id)


async def folder_rule(conn: asyncpg.Connection, mailbox_id: UUID, folder: str) -> asyncpg.Record | None:
    return await conn.fetchrow(_FOLDER_RULE_SELECT + " WHERE f.mailbox_id = $1 AND f.folder = $2", mailbox_id, folder)


async def insert_folder_rule(conn: asyncpg.Connection, mailbox_id: UUID, folder: str, regarding_kind: str,
                             regarding_id: UUID, folder_id: str | None = None) -> asyncpg.Record:
    await conn.execute(
        """INSERT INTO folder_tracking_rule (mailbox_id, folder, folder_id, regarding_kind, regarding_id)
           VALUES ($1, $2, $3, $4, $5)""",
        mailbox_id, folder, folder_id, regarding_kind, regarding_id,
    )
    return await folder_rule(conn, mailbox_id, folder)


async def delete_folder_rule(conn: asyncpg.Connection, mailbox_id: UUID, folder: str) -> bool:
    return await conn.fetchval(
        "DELETE FROM folder_tracking_rule WHERE mailbox_id = $1 AND folder = $2 RETURNING true", mailbox_id, folder,
    ) is not None


async def mailbox_alerts(conn: asyncpg.Connection, mailbox_id: UUID, limit: int = 20) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM mailbox_alert WHERE mailbox_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2", mailbox_id, limit
    )


async def insert_alert(conn: asyncpg.Connection, mailbox_id: UUID, severity: str, direction: str | None,
                       code: str, message: str) -> asyncpg.Record:
    return await conn.fetchrow(
        """INSERT INTO mailbox_alert (mailbox_id, severity, direction, code, message)
           VALUES ($1, $2, $3, $4, $5) RETURNING *""",
        mailbox_id, severity, direction, code, message,
    )


async def record_direction_failure(conn: asyncpg.Connection, mailbox_id: UUID, direction: str,
                                   base_seconds: float, cap_seconds: float, *, refused_login: bool = False) -> asyncpg.Record:
    """Count a failure and push the back-off out exponentially: base * 2^(errors-1), capped.  A
    ``refused_login`` (the server refused the credentials) is counted apart too.  Returns the counts,
    the back-off's end, the direction's Test & Enable status, and the profile's
    ``stop_after_refused_logins`` (None: never stop)."""
    _check_direction(direction)
    return await conn.fetchrow(
        f"""UPDATE mailbox m SET {direction}_error_count = {direction}_error_count + 1,
                   {direction}_refused_logins = {direction}_refused_logins + CASE WHEN $4 THEN 1 ELSE 0 END,
                   {direction}_backoff_until = now() + make_interval(secs => least($3::float8,
                        $2::float8 * power(2, least({direction}_error_count, 30)))),
                   updated_at = now()
            WHERE id = $1
            RETURNING {direction}_error_count AS error_count, {direction}_backoff_until AS backoff_until,
                      {direction}_refused_logins AS refused_logins, {direction}_status AS status,
                      (SELECT stop_after_refused_logins FROM email_server_profile p WHERE p.id = m.profile_id)
                          AS stop_after_refused_logins""",
        mailbox_id, base_seconds, cap_seconds, refused_login,
    )


async def stop_direction(conn: asyncpg.Connection, mailbox_id: UUID, direction: str, message: str) -> None:
    """Take the direction out of processing until Test & Enable succeeds again: its result becomes a
    failure that says why (``mailboxes_to_process`` wants 'success')."""
    _check_direction(direction)
    await conn.execute(
        f"""UPDATE mailbox SET {direction}_status = 'failure', {direction}_test_message = $2,
                   {direction}_stopped_at = now(), updated_at = now()
            WHERE id = $1""",
        mailbox_id, message,
    )


async def record_direction_success(conn: asyncpg.Connection, mailbox_id: UUID, direction: str) -> bool:
    """Clear errors and back-off; True when the mailbox was failing before (it has recovered)."""
    _check_direction(direction)
    row = await conn.fetchrow(
        f"""UPDATE mailbox m SET {direction}_error_count = 0, {direction}_backoff_until = NULL,
                   {direction}_refused_logins = 0, updated_at = now()
            FROM (SELECT {direction}_error_count AS before FROM mailbox WHERE id = $1 FOR UPDATE) old
            WHERE m.id = $1 AND m.{direction}_error_count > 0 RETURNING old.before""",
        mailbox_id,
    )
    return row is not None


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}")


# The one query every service uses to decide what to touch.  A mailbox is processed for a
# direction only when: it is active, it has a profile, its address is approved, its owner (if any)
# is active and uses server-side sync for that direction (or forward mailbox, for a forward
# mailbox's incoming mail), Test & Enable succeeded for that direction, and it is not backing off
# (an edit of its server or credentials ends a back-off: ``retry_with_new_settings``).
# (A direction stopped after refused sign-ins has a failed result: ``stop_direction``.)
_OWNER_METHOD = {
    "incoming": "coalesce(u.incoming_method, q.incoming_method)",
    "outgoing": "coalesce(u.outgoing_method, q.outgoing_method)",
    "act": "u.act_method",
}


async def mailboxes_to_process(conn: asyncpg.Connection, direction: str, *, organization_id: UUID | None = None,
                               mailbox_ids: list[UUID] | None = None) -> list[asyncpg.Record]:
    _check_direction(direction)
    forward_clause = "true" if direction == "incoming" else "false"
    return await conn.fetch(
        f"""SELECT m.*, to_jsonb(p.*) AS profile,
                   CASE WHEN m.owner_user_id IS NOT NULL THEN 'user'
                        WHEN m.owner_queue_id IS NOT NULL THEN 'queue' END AS owner_kind,
                   coalesce(m.owner_user_id, m.owner_queue_id) AS owner_id
            FROM mailbox m
            JOIN email_server_profile p ON p.id = m.profile_id
            LEFT JOIN crm_user u ON u.id = m.owner_user_id
            LEFT JOIN queue q ON q.id = m.owner_queue_id
            WHERE m.active AND m.email_approved
              AND m.{direction}_status = 'success'
              AND (m.{direction}_backoff_until IS NULL OR m.{direction}_backoff_until <= now())
              AND CASE WHEN m.owner_user_id IS NULL AND m.owner_queue_id IS NULL THEN {forward_clause}
                       ELSE coalesce(u.active, q.active) AND {_OWNER_METHOD[direction]} = 'server_side_sync' END
              AND ($1::uuid IS NULL OR m.organization_id = $1)
              AND ($2::uuid[] IS NULL OR m.id = ANY($2))
            ORDER BY m.id""",
        organization_id, mailbox_ids,
    )


# --- activities and decisions ----------------------------------------------------------------------

async def activities(conn: asyncpg.Connection, org_id: UUID, limit: int = 50) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT a.*, coalesce(array_agg(am.mailbox_id) FILTER (WHERE am.mailbox_id IS NOT NULL), '{}') AS mailbox_ids
           FROM email_activity a LEFT JOIN email_activity_mailbox am ON am.activity_id = a.id
           WHERE a.organization_id = $1 GROUP BY a.id ORDER BY a.created_at DESC LIMIT $2""",
        org_id, limit,
    )


async def activity_by_ref(conn: asyncpg.Connection, org_id: UUID, ref: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """SELECT a.*, coalesce(array_agg(am.mailbox_id) FILTER (WHERE am.mailbox_id IS NOT NULL), '{}') AS mailbox_ids
           FROM email_activity a LEFT JOIN email_activity_mailbox am ON am.activity_id = a.id
           WHERE a.organization_id = $1 AND (a.id::text = $2 OR a.message_id = $2 OR a.message_id = trim(both '<>' from $2))
           GROUP BY a.id""",
        org_id, ref,
    )


async def decisions_for_message(conn: asyncpg.Connection, org_id: UUID, message_id: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT d.*, m.email AS mailbox_email FROM email_decision d JOIN mailbox m ON m.id = d.mailbox_id
           WHERE d.organization_id = $1 AND (d.message_id = $2 OR d.message_id = trim(both '<>' from $2))
           ORDER BY m.email""",
        org_id, message_id,
    )


async def mailbox_sync(conn: asyncpg.Connection, mailbox_id: UUID) -> tuple[asyncpg.Record, list[asyncpg.Record]]:
    """Ingest's bookkeeping of one mailbox: its live lease and counts, and its IMAP folders' state."""
    summary = await conn.fetchrow(
        """SELECT l.holder AS worked_by, l.expires_at AS lease_expires_at,
                  (SELECT count(*) FROM pop3_seen WHERE mailbox_id = $1) AS pop3_seen,
                  (SELECT count(*) FROM ingested_message WHERE mailbox_id = $1) AS ingested,
                  (SELECT max(ingested_at) FROM ingested_message WHERE mailbox_id = $1) AS last_ingested_at,
                  h.held, h.held_since, d.rule AS held_for
           FROM (SELECT 1) one LEFT JOIN mailbox_lease l ON l.mailbox_id = $1 AND l.expires_at > now()
           -- evaluate's held messages: how many wait for the mailbox, since when, and what the oldest waits for
           CROSS JOIN (SELECT count(*) AS held, min(held_since) AS held_since FROM held_message WHERE mailbox_id = $1) h
           LEFT JOIN LATERAL (SELECT message_id FROM held_message WHERE mailbox_id = $1 ORDER BY seq LIMIT 1) oldest ON true
           LEFT JOIN email_decision d ON d.mailbox_id = $1 AND d.message_id = oldest.message_id AND d.held""",
        mailbox_id,
    )
    folders = await conn.fetch(
        """SELECT folder, uidvalidity, last_uid, highestmodseq, updated_at AS changed_at FROM imap_folder_state
           WHERE mailbox_id = $1 ORDER BY folder""", mailbox_id)
    return summary, folders


_OUTBOUND = """SELECT o.id, o.idempotency_key, o.status, o.mailbox_id, m.email AS mailbox_email, o.request -> 'to' AS to,
                      o.subject, o.message_id, o.transport, o.attempts, o.reason, o.detail, o.smtp_code, o.smtp_reply,
                      o.activity_id, o.worker_id, o.started_at, o.next_attempt_at, o.deadline, o.requested_at, o.sent_at,
                      o.created_at, o.updated_at
               FROM outbound_email o LEFT JOIN mailbox m ON m.id = o.mailbox_id"""


async def outbound_requests(conn: asyncpg.Connection, org_id: UUID, status: str | None, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        _OUTBOUND + " WHERE o.organization_id = $1 AND ($2::text IS NULL OR o.status = $2) ORDER BY o.created_at DESC LIMIT $3",
        org_id, status, limit,
    )


async def outbound_request_by_ref(conn: asyncpg.Connection, org_id: UUID, ref: str) -> asyncpg.Record | None:
    """By idempotency key, request id or Message-ID (the key first: keys are the requester's name for it)."""
    return await conn.fetchrow(
        _OUTBOUND + """ WHERE o.organization_id = $1
                          AND (o.idempotency_key = $2 OR o.id::text = $2 OR o.message_id = trim(both '<>' from $2))
                        ORDER BY o.idempotency_key = $2 DESC, o.created_at DESC LIMIT 1""",
        org_id, ref,
    )


async def outbound_request_by_message_id(conn: asyncpg.Connection, org_id: UUID, message_id: str) -> asyncpg.Record | None:
    """The request whose email carries this Message-ID (with or without its angle brackets)."""
    return await conn.fetchrow(
        _OUTBOUND + """ WHERE o.organization_id = $1 AND o.message_id = trim(both '<>' from $2)
                        ORDER BY o.created_at DESC LIMIT 1""",
        org_id, message_id,
    )


async def outbound_request_body(conn: asyncpg.Connection, request_id: UUID) -> dict[str, Any] | None:
    """The request as dispatch accepted it (the ``email.outbound`` event's data)."""
    return await conn.fetchval("SELECT request FROM outbound_email WHERE id = $1", request_id)


async def _update(conn: asyncpg.Connection, table: str, row_id: UUID, fields: dict[str, Any]) -> asyncpg.Record:
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=2))
    return await conn.fetchrow(f"UPDATE {table} SET {assignments} WHERE id = $1 RETURNING *", row_id, *fields.values())
