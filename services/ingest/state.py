"""Ingest's SQL: per-folder IMAP state, POP3 UIDL bookkeeping, the messages already ingested (and
whether they are still on the server), the messages a queue may now delete from the server (their
activity is durable), and the messages the server refused to hand over (retried, then skipped).

An IMAP UID is stored with the UIDVALIDITY it belongs to: after a folder is renumbered, old UIDs
must not name (and so mark or delete) whatever message now has that number."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple, Sequence
from uuid import UUID

import asyncpg

from services.ingest import leases
from services.ingest.leases import LeaseLost
from shared.mime import generated_message_id
from shared.rawstore import load_raw

# Syncs in which the server refused to hand over a message before it is skipped (and an IMAP
# folder's saved state may move past it).  A refusal can be brief; Gmail's "Some messages could not
# be FETCHed" comes back for the same message every time, and would otherwise hold the folder for ever.
REFUSALS_BEFORE_SKIP = 3


@dataclass(frozen=True)
class FolderSyncState:
    uidvalidity: int
    last_uid: int
    highestmodseq: int | None


class IngestedMessage(NamedTuple):
    """A message recorded as ingested.  A NamedTuple: one is built per message (cheaper than a
    frozen dataclass), and ``record_ingested`` turns a batch into its columns with one ``zip``."""

    message_key: str
    raw_sha256: str
    folder: str | None = None
    uid: int | None = None
    uidl: str | None = None
    uidvalidity: int | None = None


async def bind_server(conn: asyncpg.Connection, mailbox_id: UUID, server: str) -> bool:
    """Record that ``server`` (protocol, account, host and port) is where the mailbox's mail is read
    from; True when it replaces another one.  Then everything saved about the old server is
    forgotten in the same transaction: folder states (the new server is read from its start, and the
    messages already ingested are recognised by their keys), UIDLs, refusals, and the places of
    ingested messages (so a queue never deletes by an old UID or UIDL; a message found again on the
    new server takes its place there)."""
    async with conn.transaction():
        previous = await conn.fetchval(
            """WITH previous AS (SELECT server FROM ingest_server WHERE mailbox_id = $1 FOR UPDATE),
                    written AS (INSERT INTO ingest_server (mailbox_id, server) VALUES ($1, $2)
                                ON CONFLICT (mailbox_id) DO UPDATE SET server = EXCLUDED.server, bound_at = now()
                                WHERE ingest_server.server <> EXCLUDED.server)
               SELECT server FROM previous""",
            mailbox_id, server)
        if previous is None or previous == server:
            return False   # the same server, or the first session since this was recorded
        await conn.execute("DELETE FROM imap_folder_state WHERE mailbox_id = $1", mailbox_id)
        await conn.execute("DELETE FROM pop3_seen WHERE mailbox_id = $1", mailbox_id)
        await conn.execute("DELETE FROM refused_message WHERE mailbox_id = $1", mailbox_id)
        await conn.execute("DELETE FROM ingested_copy WHERE mailbox_id = $1", mailbox_id)
        await conn.execute(
            """UPDATE ingested_message SET folder = NULL, uid = NULL, uidl = NULL, uidvalidity = NULL
               WHERE mailbox_id = $1 AND (folder IS NOT NULL OR uid IS NOT NULL OR uidl IS NOT NULL)""",
            mailbox_id)
        return True


class RuleOnboarding(NamedTuple):
    """A folder's folder-level tracking rule whose onboarding is not done: the messages ingest read
    from the folder before the rule was added, and that are still there, are still to be announced
    again (``refiled``), so evaluate files them under the rule's record."""

    created_at: datetime       # which rule: one removed and added again is another, onboarded anew
    uidvalidity: int | None    # progress: under this UIDVALIDITY, the messages up to ``uid`` are done
    uid: int


async def folder_sync_start(conn: asyncpg.Connection, mailbox_id: UUID,
                            folder: str) -> tuple[FolderSyncState | None, RuleOnboarding | None]:
    """The folder's saved sync state, and its rule's onboarding when that is not done: one query,
    as a poll costs one (a folder without a rule, or whose rule is onboarded, has None)."""
    row = await conn.fetchrow(
        """SELECT s.uidvalidity, s.last_uid, s.highestmodseq, r.created_at, r.onboarded_uidvalidity, r.onboarded_uid
           FROM (SELECT $1::uuid AS mailbox_id, $2::text AS folder) k
           LEFT JOIN imap_folder_state s ON s.mailbox_id = k.mailbox_id AND s.folder = k.folder
           LEFT JOIN folder_tracking_rule r ON r.mailbox_id = k.mailbox_id AND r.folder = k.folder
                                           AND r.onboarded_at IS NULL""",
        mailbox_id, folder,
    )
    saved = (FolderSyncState(row["uidvalidity"], row["last_uid"], row["highestmodseq"])
             if row["uidvalidity"] is not None else None)
    onboarding = (RuleOnboarding(row["created_at"], row["onboarded_uidvalidity"], row["onboarded_uid"] or 0)
                  if row["created_at"] is not None else None)
    return saved, onboarding


class ReadBefore(NamedTuple):
    """A message ingest read from a folder (where it still was at the last sync), for onboarding."""

    message_key: str
    raw_sha256: str
    uid: int
    size: int


async def read_before(conn: asyncpg.Connection, mailbox_id: UUID, folder: str, uidvalidity: int,
                      after_uid: int, through_uid: int, limit: int) -> list[ReadBefore]:
    """The messages ingested and placed in ``folder`` under ``uidvalidity`` with UIDs in
    (``after_uid``, ``through_uid``], not known to be gone from the server: the first ``limit`` by UID."""
    rows = await conn.fetch(
        """SELECT im.message_key, im.raw_sha256, im.uid, r.size
           FROM ingested_message im JOIN raw_message r ON r.sha256 = im.raw_sha256
           WHERE im.mailbox_id = $1 AND im.folder = $2 AND im.uid > $4 AND im.uid <= $5 AND im.uidvalidity = $3
             AND NOT im.removed_from_server
           ORDER BY im.uid LIMIT $6""",
        mailbox_id, folder, uidvalidity, after_uid, through_uid, limit,
    )
    return [ReadBefore(**dict(r)) for r in rows]


async def onboarding_progress(conn: asyncpg.Connection, mailbox_id: UUID, folder: str, rule: RuleOnboarding,
                              uidvalidity: int, uid: int, *, done: bool) -> None:
    """Record how far the rule's onboarding has come (the messages of ``folder`` up to ``uid``
    under ``uidvalidity`` are done), and with ``done`` that it is over.  In the transaction that
    records the sync progress those messages' announcements stand for, so a crash repeats at most
    what was announced and not yet recorded."""
    await conn.execute(
        """UPDATE folder_tracking_rule SET onboarded_uidvalidity = $4, onboarded_uid = $5,
                  onboarded_at = CASE WHEN $6 THEN now() END
           WHERE mailbox_id = $1 AND folder = $2 AND created_at = $3 AND onboarded_at IS NULL""",
        mailbox_id, folder, rule.created_at, uidvalidity, uid, done,
    )


async def save_folder_state(conn: asyncpg.Connection, mailbox_id: UUID, folder: str, state: FolderSyncState) -> None:
    await conn.execute(
        """INSERT INTO imap_folder_state (mailbox_id, folder, uidvalidity, last_uid, highestmodseq)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (mailbox_id, folder) DO UPDATE SET uidvalidity = $3, last_uid = $4, highestmodseq = $5, updated_at = now()""",
        mailbox_id, folder, state.uidvalidity, state.last_uid, state.highestmodseq,
    )


async def already_ingested(conn: asyncpg.Connection, mailbox_id: UUID, keys: Sequence[str], *,
                           lease_holder: str | None = None) -> set[str]:
    """The keys already ingested for the mailbox.  With ``lease_holder``: first, in the same
    statement, that this replica still holds the mailbox's lease (else ``LeaseLost``), so a session
    whose lease was taken over stores and publishes nothing more."""
    row = await conn.fetchrow(
        """SELECT ($3::text IS NULL OR EXISTS (SELECT FROM mailbox_lease WHERE mailbox_id = $1 AND holder = $3)) AS held,
                  ARRAY(SELECT message_key FROM ingested_message WHERE mailbox_id = $1 AND message_key = ANY($2::text[])) AS seen""",
        mailbox_id, list(keys), lease_holder,
    )
    if not row["held"]:
        raise LeaseLost(mailbox_id)
    return set(row["seen"])


async def record_ingested(conn: asyncpg.Connection, mailbox_id: UUID, messages: Sequence[IngestedMessage],
                          uidvalidity: int | None = None) -> None:
    """Record messages as ingested; IMAP callers give the folder's ``uidvalidity`` their UIDs belong to."""
    if not messages:
        return
    keys, hashes, folders, uids, uidls, _ = zip(*messages)     # the batch as columns, one pass
    await conn.execute(
        """INSERT INTO ingested_message (mailbox_id, message_key, raw_sha256, folder, uid, uidl, uidvalidity)
           SELECT $1, *, $7::bigint FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[])
           ON CONFLICT (mailbox_id, message_key) DO UPDATE SET folder = EXCLUDED.folder, uid = EXCLUDED.uid,
               uidl = EXCLUDED.uidl, uidvalidity = EXCLUDED.uidvalidity""",
        mailbox_id, keys, hashes, folders, uids, uidls, uidvalidity,
    )


async def filed_elsewhere(conn: asyncpg.Connection, mailbox_id: UUID, folder: str, keys: Sequence[str], *,
                          renumbered_to: int | None = None) -> dict[str, str]:
    """Of messages found in ``folder`` under keys already ingested, those ingested from another
    folder, when a folder-level tracking rule maps ``folder`` to a record: message key -> hash of the
    stored raw bytes.  Empty for a folder without a rule.  With ``renumbered_to`` (the folder is read
    again from its start, under that UIDVALIDITY, while its rule's onboarding is not done), also
    those read from ``folder`` itself under another numbering: the folder's mail from before the rule."""
    rows = await conn.fetch(
        """SELECT im.message_key, im.raw_sha256 FROM ingested_message im
           WHERE im.mailbox_id = $1 AND im.message_key = ANY($3::text[])
             AND (im.folder IS DISTINCT FROM $2 OR ($4::bigint IS NOT NULL AND im.uidvalidity IS DISTINCT FROM $4))
             AND EXISTS (SELECT 1 FROM folder_tracking_rule r WHERE r.mailbox_id = $1 AND r.folder = $2)""",
        mailbox_id, folder, list(keys), renumbered_to)
    return {r["message_key"]: r["raw_sha256"] for r in rows}


# An ingested message ``im`` found again in another folder while its own place is still on the
# server: a further copy (a server rule, a user's copy), not a move; a move's place vanished.
_ELSEWHERE = "(im.folder IS NOT NULL AND im.folder <> {folder} AND NOT im.removed_from_server)"


async def renumber_ingested(conn: asyncpg.Connection, mailbox_id: UUID, folder: str, uidvalidity: int,
                            found: Sequence[tuple[str, int]], *, copies_elsewhere: bool = False) -> None:
    """Messages already ingested and found again in ``folder`` (``found``: message key, UID): under a
    new UIDVALIDITY, or moved there from another tracked folder.  Their rows take the new place and
    count as on the server, so a queue that deletes after processing finds them.  A second copy in
    the same folder and numbering leaves the row alone; with ``copies_elsewhere`` (a queue that
    deletes, ``record_copies``), so does one in another folder while the row's own place is still on
    the server: a copy may be anywhere, and both places are removed."""
    if not found:
        return
    await conn.execute(
        f"""UPDATE ingested_message im SET folder = $2, uid = f.uid, uidvalidity = $3, removed_from_server = false
           FROM unnest($4::text[], $5::bigint[]) AS f(message_key, uid)
           WHERE im.mailbox_id = $1 AND im.message_key = f.message_key
             AND (im.folder IS DISTINCT FROM $2 OR im.uidvalidity IS DISTINCT FROM $3)
             AND NOT ($6 AND {_ELSEWHERE.format(folder="$2")})""",
        mailbox_id, folder, uidvalidity, [k for k, _ in found], [u for _, u in found], copies_elsewhere,
    )


async def mark_vanished(conn: asyncpg.Connection, mailbox_id: UUID, folder: str, uidvalidity: int,
                        ranges: Sequence[tuple[int, int]]) -> int:
    """The server reported these UID ranges of ``folder`` expunged (QRESYNC VANISHED): the messages
    ingested from there are no longer on the server.  Returns how many rows that changed."""
    if not ranges:
        return 0
    status = await conn.execute(
        """UPDATE ingested_message im SET removed_from_server = true
           FROM unnest($4::bigint[], $5::bigint[]) AS r(first_uid, last_uid)
           WHERE im.mailbox_id = $1 AND im.folder = $2 AND im.uidvalidity = $3
             AND im.uid BETWEEN r.first_uid AND r.last_uid AND NOT im.removed_from_server""",
        mailbox_id, folder, uidvalidity, [first for first, _ in ranges], [last for _, last in ranges],
    )
    await conn.execute(
        """DELETE FROM ingested_copy c USING unnest($4::bigint[], $5::bigint[]) AS r(first_uid, last_uid)
           WHERE c.mailbox_id = $1 AND c.folder = $2 AND c.uidvalidity = $3 AND c.uid BETWEEN r.first_uid AND r.last_uid""",
        mailbox_id, folder, uidvalidity, [first for first, _ in ranges], [last for _, last in ranges],
    )
    return int(status.split()[-1])


async def pop3_seen(conn: asyncpg.Connection, mailbox_id: UUID) -> set[str]:
    rows = await conn.fetch("SELECT uidl FROM pop3_seen WHERE mailbox_id = $1", mailbox_id)
    return {r["uidl"] for r in rows}


async def mark_pop3_seen(conn: asyncpg.Connection, mailbox_id: UUID, uidls: Sequence[str]) -> None:
    await conn.execute(
        "INSERT INTO pop3_seen (mailbox_id, uidl) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
        mailbox_id, list(uidls),
    )


async def forget_pop3_uidls(conn: asyncpg.Connection, mailbox_id: UUID, present: Sequence[str],
                            repeated: Sequence[str] = ()) -> None:
    """At the end of a POP3 session, ``present`` being the ids of its listing: drop the bookkeeping
    of messages no longer on the server, so the tables do not grow for ever, and mark the messages
    ingested from there as removed (another client deleted them, or the server did at a QUIT whose
    answer was lost).  So a row stands for the listing entry it was ingested from only while that
    entry is listed at every session, and a UIDL the server later gives to another message (RFC 1939
    forbids it; ``pop3_reuse_xuidl`` does it) never makes a queue delete that message for this row.
    The rows and copies under a UIDL the listing has more than once (``repeated``) lose their place
    for good: which message the UIDL names is not known, now or after the others leave."""
    async with conn.transaction():
        await conn.execute("DELETE FROM pop3_seen WHERE mailbox_id = $1 AND NOT (uidl = ANY($2::text[]))",
                           mailbox_id, list(present))
        await conn.execute("DELETE FROM ingested_copy WHERE mailbox_id = $1 AND uidl IS NOT NULL "
                           "AND (NOT (uidl = ANY($2::text[])) OR uidl = ANY($3::text[]))",
                           mailbox_id, list(present), list(repeated))
        await conn.execute("UPDATE ingested_message SET removed_from_server = true WHERE mailbox_id = $1 "
                           "AND uidl IS NOT NULL AND NOT removed_from_server AND NOT (uidl = ANY($2::text[]))",
                           mailbox_id, list(present))
        if repeated:
            await conn.execute("UPDATE ingested_message SET uidl = NULL WHERE mailbox_id = $1 AND uidl = ANY($2::text[])",
                               mailbox_id, list(repeated))


async def deletable(conn: asyncpg.Connection, mailbox_id: UUID, *,
                    lease_holder: str | None = None) -> list[IngestedMessage]:
    """Messages still on the server whose activity is durable, and the further copies of them
    (``record_copies``): evaluate records a decision and its activity in one transaction, and only a
    decision with an activity (tracked, or already tracked from another mailbox) counts, and only
    when the message is the activity's (``_activity_messages``).  Mail that did not become an
    activity (queue conversion off, no correlation match, unknown sender, inactive mailbox, another
    message reusing the Message-ID of one tracked elsewhere, ...) stays on the server.  With
    ``lease_holder``: first, in the same transaction, that this replica still holds the mailbox's
    lease (else ``LeaseLost``): a session whose lease was taken over removes nothing more."""
    async with conn.transaction():
        await leases.hold(conn, mailbox_id, lease_holder)
        rows = await conn.fetch(
            """SELECT im.message_key, im.raw_sha256, im.folder, im.uid, im.uidl, im.uidvalidity, a.raw_sha256 AS activity_raw
               FROM ingested_message im
               JOIN email_decision d ON d.mailbox_id = im.mailbox_id AND d.message_id = im.message_key
               JOIN email_activity a ON a.id = d.activity_id
               WHERE im.mailbox_id = $1 AND NOT im.removed_from_server
               UNION ALL
               SELECT c.message_key, im.raw_sha256, c.folder, c.uid, c.uidl, c.uidvalidity, a.raw_sha256
               FROM ingested_copy c
               JOIN ingested_message im ON im.mailbox_id = c.mailbox_id AND im.message_key = c.message_key
               JOIN email_decision d ON d.mailbox_id = c.mailbox_id AND d.message_id = c.message_key
               JOIN email_activity a ON a.id = d.activity_id
               WHERE c.mailbox_id = $1""",
            mailbox_id,
        )
        others = await _activity_messages(conn, {(r["raw_sha256"], r["activity_raw"]) for r in rows
                                                 if r["activity_raw"] not in (None, r["raw_sha256"])})
    return [IngestedMessage(*tuple(r)[:6]) for r in rows if r["activity_raw"] in (None, r["raw_sha256"])
            or (r["raw_sha256"], r["activity_raw"]) in others]


# Pairs of raw messages compared at once by ``_activity_messages``: bounds the bytes held.
_COMPARED_AT_ONCE = 64


async def _activity_messages(conn: asyncpg.Connection, pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Of (raw of an ingested message, raw its activity was made from) pairs with different bytes,
    those that are one message: the same From, To, Cc, Date, Subject and body
    (``generated_message_id``), as two mailboxes' copies of one delivery are (they differ in trace
    fields: Received, Delivered-To, Return-Path ...).  Another message that merely reuses the
    Message-ID of one tracked elsewhere (a scanner's fixed one, a forged one) is not, and is not
    deleted.  Usually there are none (a message is its activity's own bytes), so the raws are read
    only for these.  An activity without raw bytes (sent by Conduit, whose Message-IDs are its own
    and unique) is trusted by its Message-ID."""
    same: set[tuple[str, str]] = set()
    ordered = sorted(pairs)
    for start in range(0, len(ordered), _COMPARED_AT_ONCE):
        chunk = ordered[start:start + _COMPARED_AT_ONCE]
        raws = await load_raw(conn, [h for pair in chunk for h in pair])
        identity = {h: generated_message_id(raw) for h, raw in raws.items()}
        same.update(pair for pair in chunk
                    if pair[0] in identity and identity.get(pair[0]) == identity.get(pair[1]))
    return same


async def record_copies(conn: asyncpg.Connection, mailbox_id: UUID, copies: Sequence[IngestedMessage]) -> None:
    """Of messages found again (already ingested), record those at another place than the ingested
    one: a further copy, to be removed with it by a queue that deletes after processing.  Found in
    another folder, it is a further copy only while the ingested place is still on the server (else
    it moved, ``renumber_ingested``).  The ingested copy itself, found again after a crash or a
    renumbering, is not a further copy."""
    if not copies:
        return
    await conn.execute(
        f"""INSERT INTO ingested_copy (mailbox_id, message_key, folder, uidvalidity, uid, uidl)
           SELECT $1, f.message_key, f.folder, f.uidvalidity, f.uid, f.uidl
           FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[])
                AS f(message_key, folder, uidvalidity, uid, uidl)
           JOIN ingested_message im ON im.mailbox_id = $1 AND im.message_key = f.message_key
           WHERE (f.uid IS NOT NULL AND ((im.folder IS NOT DISTINCT FROM f.folder
                  AND im.uidvalidity IS NOT DISTINCT FROM f.uidvalidity AND im.uid IS DISTINCT FROM f.uid)
                  OR {_ELSEWHERE.format(folder="f.folder")}))
              OR (f.uidl IS NOT NULL AND im.uidl IS DISTINCT FROM f.uidl)
           ON CONFLICT DO NOTHING""",
        mailbox_id, [c.message_key for c in copies], [c.folder for c in copies], [c.uidvalidity for c in copies],
        [c.uid for c in copies], [c.uidl for c in copies],
    )


async def forget_renumbered_copies(conn: asyncpg.Connection, mailbox_id: UUID, folder: str, uidvalidity: int) -> None:
    """The folder was renumbered: further copies recorded under another UIDVALIDITY name nothing now."""
    await conn.execute("DELETE FROM ingested_copy WHERE mailbox_id = $1 AND folder = $2 AND uidvalidity <> $3",
                       mailbox_id, folder, uidvalidity)


# The places of ``mark_removed``'s messages, and a row of table ``t`` at one of them.
_PLACES = ("unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[])"
           " AS r(message_key, folder, uidvalidity, uid, uidl)")
_AT_PLACE = """{t}.mailbox_id = $1 AND {t}.message_key = r.message_key AND {t}.folder IS NOT DISTINCT FROM r.folder
             AND {t}.uidvalidity IS NOT DISTINCT FROM r.uidvalidity AND {t}.uid IS NOT DISTINCT FROM r.uid
             AND {t}.uidl IS NOT DISTINCT FROM r.uidl"""


async def mark_removed(conn: asyncpg.Connection, mailbox_id: UUID, removed: Sequence[IngestedMessage]) -> None:
    """What was removed from the server, by place: an ingested copy is marked removed, a further copy
    is forgotten."""
    if not removed:
        return
    places = ([r.message_key for r in removed], [r.folder for r in removed], [r.uidvalidity for r in removed],
              [r.uid for r in removed], [r.uidl for r in removed])
    await conn.execute(f"UPDATE ingested_message im SET removed_from_server = true FROM {_PLACES} "
                       f"WHERE {_AT_PLACE.format(t='im')}", mailbox_id, *places)
    await conn.execute(f"DELETE FROM ingested_copy c USING {_PLACES} WHERE {_AT_PLACE.format(t='c')}",
                       mailbox_id, *places)


async def undeliverable(conn: asyncpg.Connection, mailbox_id: UUID, *,
                        lease_holder: str | None = None) -> dict[tuple[str, int], list[int]]:
    """Messages skipped after repeated refusals and not yet moved to the Undeliverable folder, by
    (IMAP folder, UIDVALIDITY): their UIDs.  Fenced by the lease like ``deletable``."""
    async with conn.transaction():
        await leases.hold(conn, mailbox_id, lease_holder)
        rows = await conn.fetch(
            """SELECT folder, uidvalidity, array_agg(server_id::bigint ORDER BY server_id::bigint) AS uids
               FROM refused_message WHERE mailbox_id = $1 AND folder <> '' AND skipped_at IS NOT NULL AND moved_at IS NULL
               GROUP BY folder, uidvalidity""",
            mailbox_id,
        )
    return {(r["folder"], r["uidvalidity"]): list(r["uids"]) for r in rows}


async def mark_moved(conn: asyncpg.Connection, mailbox_id: UUID, folder: str, uidvalidity: int,
                     uids: Sequence[int]) -> None:
    await conn.execute(
        """UPDATE refused_message SET moved_at = now() WHERE mailbox_id = $1 AND folder = $2 AND uidvalidity = $3
             AND server_id = ANY($4::text[])""",
        mailbox_id, folder, uidvalidity, [str(u) for u in uids],
    )


class Refusal(NamedTuple):
    """A message the server refused to hand over (IMAP UID, POP3 UIDL), as counted so far."""

    server_id: str
    attempts: int
    skipped: bool
    reason: str


async def skipped_uids(conn: asyncpg.Connection, mailbox_id: UUID, folder: str, uidvalidity: int,
                       from_uid: int) -> set[int]:
    """UIDs of ``folder`` from ``from_uid`` on that were skipped after repeated refusals."""
    rows = await conn.fetch(
        """SELECT server_id FROM refused_message WHERE mailbox_id = $1 AND folder = $2 AND uidvalidity = $3
             AND skipped_at IS NOT NULL AND server_id::bigint >= $4""",
        mailbox_id, folder, uidvalidity, from_uid,
    )
    return {int(r["server_id"]) for r in rows}


async def count_refusals(conn: asyncpg.Connection, mailbox_id: UUID, folder: str, uidvalidity: int,
                         refused: dict[str, str], skip_after: int = REFUSALS_BEFORE_SKIP) -> list[Refusal]:
    """At the end of a sync that asked for every message not yet ingested (of ``folder``; '' and 0
    for POP3): count one more refusal of each of ``refused`` (server id -> the server's words) and
    skip those refused ``skip_after`` times.  Refusals not repeated are forgotten: the message came,
    or is gone.  Skipped rows stay, as the record of what was never ingested."""
    await conn.execute(
        """DELETE FROM refused_message WHERE mailbox_id = $1 AND folder = $2 AND skipped_at IS NULL
             AND NOT (uidvalidity = $3 AND server_id = ANY($4::text[]))""",
        mailbox_id, folder, uidvalidity, list(refused),
    )
    if not refused:
        return []
    rows = await conn.fetch(
        """INSERT INTO refused_message AS r (mailbox_id, folder, uidvalidity, server_id, reason, skipped_at)
           SELECT $1, $2, $3, f.server_id, f.reason, CASE WHEN $6 <= 1 THEN now() END
           FROM unnest($4::text[], $5::text[]) AS f(server_id, reason)
           ON CONFLICT (mailbox_id, folder, uidvalidity, server_id) DO UPDATE
             SET attempts = r.attempts + 1, reason = EXCLUDED.reason, last_refused_at = now(),
                 skipped_at = CASE WHEN r.attempts + 1 >= $6 THEN now() END
             WHERE r.skipped_at IS NULL
           RETURNING server_id, attempts, skipped_at IS NOT NULL AS skipped, reason""",
        mailbox_id, folder, uidvalidity, list(refused), list(refused.values()), skip_after,
    )
    return [Refusal(**dict(r)) for r in rows]


def refusal_warnings(counted: Sequence[Refusal], kind: str, where: str,
                     skip_after: int = REFUSALS_BEFORE_SKIP) -> list[tuple[str, str]]:
    """(alert code, text) naming the refused messages: one warning for those tried again later,
    one for those skipped now.  The texts carry no attempt count, so the registry's alerts do not
    repeat at every sync (``Registry.raise_alert`` drops an alert equal to the latest)."""
    warnings = []
    for skipped, code in ((False, "messages_refused"), (True, "messages_skipped")):
        rows = sorted((r for r in counted if r.skipped == skipped), key=lambda r: (len(r.server_id), r.server_id))
        if not rows:
            continue
        names = f"{kind} {', '.join(r.server_id for r in rows)}{' ' + where if where else ''}"
        if skipped:
            text = (f"skipped, never to be ingested: the server refused {names} {skip_after} times "
                    f"(it said: {rows[0].reason})")
        else:
            text = (f"the server refuses to hand over {names} (it said: {rows[0].reason}); later syncs "
                    f"try again, and skip it once refused {skip_after} times")
        warnings.append((code, text))
    return warnings
