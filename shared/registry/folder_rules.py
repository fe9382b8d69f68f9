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

from typing import get_args

import asyncpg

from shared.errors import Conflict, InvalidInput, NotFound
from shared.registry import models, repository as repo


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
