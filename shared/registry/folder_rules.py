"""Folder-level tracking rules: a mailbox's folder mapped to a contact, account or lead.

The reference's MailboxTrackingFolder: the email that ingest reads from a mapped folder is tracked
regarding the record, whatever the mailbox's tracking option (evaluate's ``folder_tracking`` rule,
which finds the rule by the ``email.received`` event's mailbox and folder).  This module holds what
a rule may be; ``Registry`` (service.py) adds, lists and removes them in its transactions.

Choices, each for a reason:
- A rule names the folder as the mailbox's tracked folders name it; a folder that is not tracked
  yet is added to them, since a rule on a folder ingest never reads would silently do nothing.
- The Inbox cannot be mapped: the reference maps folders *under* the Inbox, and a rule on the Inbox
  would make every message of the mailbox regard one record, overriding its tracking option.
- A forward mailbox's folders hold mail of many users, and a POP3 mailbox has no folders: both are
  refused rather than given rules that could never mean what they say.
"""
from __future__ import annotations

from typing import NamedTuple, get_args
from uuid import UUID, uuid4

import asyncpg

from shared.errors import Conflict, InvalidInput, NotFound
from shared.events.envelope import Envelope
from shared.events.payloads import EmailReceivedV1
from shared.events.topics import EMAIL_RECEIVED
from shared.outbox import enqueue_batch
from shared.registry import models, repository as repo

# Events per outbox row when a rule's folder is filed anew (one row holds a JSON array of them).
_REFILE_ROW = 500


class RuleAdded(NamedTuple):
    rule: models.FolderRule
    folder_added: bool   # the folder was not tracked, and now is (ingest reads it from the start)
    refiled: int         # messages already read from the folder, announced again to be filed


def parse_record_ref(ref: str) -> tuple[models.RecordKind, str]:
    """``KIND:ID`` or ``KIND:ADDRESS`` (contact:bea@customer.example) -> (kind, id or address)."""
    kinds = get_args(models.RecordKind)
    kind, sep, rest = ref.strip().partition(":")
    if not sep or kind.lower() not in kinds or not rest.strip():
        raise InvalidInput(f"a record is KIND:ID or KIND:ADDRESS with KIND one of {', '.join(kinds)} (got {ref!r:.80})",
                           reason="bad_record")
    return kind.lower(), rest.strip()  # type: ignore[return-value]


async def resolve_record(conn: asyncpg.Connection, org_id, ref: str) -> asyncpg.Record:
    """The organization's record that ``ref`` names; refused when none or several match."""
    kind, key = parse_record_ref(ref)
    found = await repo.records_by_ref(conn, org_id, kind, key)
    if not found:
        raise NotFound(f"no {kind} {key!r} in this organization (see `conduit record list --kind {kind}`)")
    if len(found) > 1:
        ids = ", ".join(str(r["id"]) for r in found)
        raise Conflict(f"{len(found)} {kind}s have the address {key}: name one by its id ({ids})")
    return found[0]


def check_rule_folder(mailbox: asyncpg.Record, profile: asyncpg.Record | None, folder: str) -> None:
    """Refuse a folder that no rule can map (see the module's docstring for why)."""
    if (problem := models.folder_name_problem(folder)) is not None:
        raise InvalidInput(problem, reason="bad_folder")
    if models.is_inbox(folder):
        raise InvalidInput("the Inbox cannot be mapped to a record (every message of the mailbox would regard it); "
                           "map a folder that mail is sorted into, such as Customers/Acme", reason="bad_folder")
    if mailbox["owner_kind"] is None:
        raise InvalidInput("a forward mailbox's folders hold the mail of many users: folder-level tracking rules "
                           "belong to a user's or a queue's mailbox", reason="forward_mailbox")
    if profile is not None and profile["server_type"] == "pop3":
        raise InvalidInput(f"the mailbox's profile {profile['name']} is POP3, which has no folders", reason="no_folders")


def as_tracked(folders: list[str], folder: str) -> str:
    """``folder`` as the mailbox's tracked folders spell it, which is how ingest names it in
    `email.received` and so how evaluate finds its rule: Inbox/Acme for a tracked INBOX/Acme.
    A name that differs from a tracked one only in case is refused: IMAP may hold both as two folders,
    and a rule on the one not read would silently do nothing."""
    key = models.folder_key(folder)
    for tracked in folders:
        if models.folder_key(tracked) == key:
            return tracked
    for tracked in folders:
        if tracked.casefold() == folder.casefold():
            raise InvalidInput(f"the mailbox tracks {tracked!r}, not {folder!r}: folder names are case-sensitive. Give "
                               f"{tracked!r} for that folder; for another folder named {folder!r}, add it to "
                               "`conduit mailbox configure --folders` first", reason="bad_folder")
    return folder


def tracked_with(folders: list[str], folder: str) -> list[str] | None:
    """The tracked folders with ``folder`` added, or None when it is tracked already."""
    if models.folder_key(folder) in {models.folder_key(f) for f in folders}:
        return None
    return [*folders, folder]


def folder_rule(row: asyncpg.Record) -> models.FolderRule:
    return models.FolderRule(**dict(row))


async def refile_folder(conn: asyncpg.Connection, org_id: UUID, mailbox_id: UUID, folder: str) -> int:
    """Announce on `email.received` again (through the outbox, in the caller's transaction) the
    messages ingest has already read from ``folder`` and that are still there, so evaluate files them
    under the folder's new rule: the reference's onboarding of a tracking rule, for a folder that
    was tracked before it had one.  Returns how many.  (The Inbox has no rules, so these are IMAP
    messages with their UIDs; their arrival time is not kept, so evaluate takes their Date.)"""
    rows = await conn.fetch(
        """SELECT im.message_key, im.raw_sha256, im.uid, r.size FROM ingested_message im
           JOIN raw_message r ON r.sha256 = im.raw_sha256
           WHERE im.mailbox_id = $1 AND im.folder = $2 AND NOT im.removed_from_server ORDER BY im.uid""",
        mailbox_id, folder)
    envelope = EMAIL_RECEIVED.envelope
    events = [(EMAIL_RECEIVED.name, str(mailbox_id), envelope(
        event_id=uuid4(), type=EMAIL_RECEIVED.name, schema_version=EMAIL_RECEIVED.schema_version, producer="registry",
        organization_id=org_id, data=EmailReceivedV1(
            mailbox_id=mailbox_id, source="imap", folder=folder, uid=r["uid"], raw_sha256=r["raw_sha256"],
            size=r["size"], message_id=r["message_key"]),
    ).model_dump_json()) for r in rows]
    for start in range(0, len(events), _REFILE_ROW):
        await enqueue_batch(conn, events[start:start + _REFILE_ROW])
    return len(events)
