"""Synchronise one mailbox's tracked IMAP folders into raw storage and `email.received`.

Per folder, the state persisted after each batch (UIDVALIDITY, highest UID seen, HIGHESTMODSEQ)
makes a restart resume exactly.  A UIDVALIDITY change means the server renumbered the folder: the
folder is read again from the start, and the per-mailbox record of ingested Message-IDs keeps that
from producing duplicates (it also keeps a message moved between tracked folders from being
processed twice); messages found again take their new UIDs.

Where the server offers QRESYNC (RFC 7162), the folder is opened with the saved UIDVALIDITY and
HIGHESTMODSEQ and the server's answer to that one command says what happened since: an unchanged
HIGHESTMODSEQ means nothing did (no SEARCH, no FETCH, no write), and the UIDs it reports vanished
are recorded as no longer on the server.  The saved HIGHESTMODSEQ only moves in the transaction that
records everything it stands for (the last batch, and the vanished UIDs), so a restart asks the
server again for whatever was not recorded.  Without QRESYNC (CONDSTORE only, or neither) new mail
is found from UIDNEXT as before, and expunges by others go unnoticed.

Batches are pipelined: while one batch's events are published and its state saved, the next
batch's raw bytes are stored and the one after is read from the server.  Each batch still goes raw
stored -> events acknowledged -> state saved, and a batch is published only after the previous
batch's state is saved, so the saved state never runs ahead of acknowledged events and events keep
the folder's order.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import aclosing
from datetime import datetime

import asyncpg

from services.ingest import state
from services.ingest.imap_client import (
    FolderState,
    ImapClient,
    ImapCommandFailed,
    KnownFolder,
)
from services.ingest.publishing import (
    Mailbox,
    Pulled,
    Stored,
    announce_stored,
    store_pulled,
)
from shared.kafka import Publisher
from shared.mime import message_key

log = logging.getLogger(__name__)

BATCH = 500
# Batches between fetched and state saved: one being published and saved, one being stored.
IN_FLIGHT = 2


class ImapFolderSync:
    def __init__(self, pool: asyncpg.Pool, publisher: Publisher, mailbox: Mailbox, *,
                 received_after: datetime | None = None, delete_after_processing: bool = False) -> None:
        self._pool = pool
        self._publisher = publisher
        self._mailbox = mailbox
        self._received_after = received_after
        self._delete = delete_after_processing
        self.missing_folders: set[str] = set()

    @property
    def deletes_processed(self) -> bool:
        """A queue mailbox that deletes mail from the server once its activity is durable."""
        return self._delete

    async def sync(self, client: ImapClient, folders: Sequence[str]) -> int:
        """Sync each folder once; return the number of new messages published."""
        await client.enable_quick_resync()   # first thing after login: ENABLE wants no folder selected
        if self._delete:
            await self.remove_processed(client)
        published = 0
        for folder in folders:
            try:
                published += await self.sync_folder(client, folder)
            except ImapCommandFailed as exc:
                # A tracked folder the server does not have: the others still sync; the runner
                # raises a warning alert once.
                self.missing_folders.add(folder)
                log.warning("mailbox %s: folder %r cannot be read: %s", self._mailbox.id, folder, exc.message)
        return published

    async def sync_folder(self, client: ImapClient, folder: str) -> int:
        await client.enable_quick_resync()   # a no-op after the first call of the session
        async with self._pool.acquire() as conn:
            saved = await state.folder_state(conn, self._mailbox.id, folder)
        known = None
        if saved is not None and saved.highestmodseq:
            known = KnownFolder(saved.uidvalidity, saved.highestmodseq, saved.last_uid)
        status = await client.select(folder, readonly=not self._delete, known=known)
        last_uid = 0
        saved_modseq = None   # what the saved state already stands for (None: nothing to keep)
        renumbered = saved is not None and saved.uidvalidity != status.uidvalidity
        if saved is not None:
            if not renumbered:
                last_uid, saved_modseq = saved.last_uid, saved.highestmodseq
            else:
                log.warning("mailbox %s folder %s: UIDVALIDITY changed %d -> %d, resynchronising",
                            self._mailbox.id, folder, saved.uidvalidity, status.uidvalidity)
        if saved is not None and not renumbered and status.uidnext - 1 <= last_uid:
            # Nothing arrived since: no SEARCH, no FETCH (the common case when polling).  With
            # QRESYNC a new HIGHESTMODSEQ means flags changed or mail vanished: recorded, still no I/O.
            if status.quick_resync and status.highestmodseq != saved_modseq:
                await self._save(folder, status, last_uid, status.highestmodseq, [], [])
            return 0
        uids = await client.uids_since(last_uid)
        if not uids:
            await self._save(folder, status, last_uid, status.highestmodseq, [], [])
            return 0
        flushes: list[asyncio.Task[int]] = []
        claimed: set[str] = set()   # keys stored by a batch of this sync, not yet recorded as ingested
        batch: list[Pulled] = []
        highest = last_uid

        async def flush(*, last: bool = False) -> None:
            if len(flushes) >= IN_FLIGHT:
                await flushes[-IN_FLIGHT]   # raises what it raised, and then nothing more is published
            previous = flushes[-1] if flushes else None
            # Batches before the last keep the modseq already saved: the new one also stands for
            # the vanished UIDs and later messages, which only the last batch's save records.
            modseq = status.highestmodseq if last else saved_modseq
            flushes.append(asyncio.create_task(self._flush(
                folder, status, highest, modseq, batch, claimed, previous, last)))

        try:
            async with aclosing(client.fetch(uids, chunk=BATCH)) as fetched:
                async for message in fetched:
                    highest = max(highest, message.uid)
                    if self._received_after and message.internaldate and message.internaldate < self._received_after:
                        continue  # "process email received after": older mail is skipped, never fetched again
                    batch.append(Pulled(message.raw, folder, message.uid, None, message.internaldate))
                    if len(batch) >= BATCH:
                        await flush()
                        batch = []
            await flush(last=True)
            return sum([await task for task in flushes])
        except asyncio.CancelledError:
            # Stopping: batches not yet done stop where they are (a batch's state is saved only
            # after its events are acknowledged, so the next sync repeats what was not saved).
            for task in flushes:
                task.cancel()
            raise
        finally:
            # After a failure reading from the server, batches already read still finish: they need
            # no IMAP.  (After a failed batch, the later ones fail at once without publishing.)
            await asyncio.gather(*flushes, return_exceptions=True)   # every outcome retrieved

    async def _flush(self, folder: str, status: FolderState, highest: int, modseq: int | None,
                     batch: list[Pulled], claimed: set[str], previous: asyncio.Task[int] | None, last: bool) -> int:
        """One batch: raw stored (while the previous batch is published and saved), then, once the
        previous batch is done, events published and acknowledged, then the folder state saved."""
        stored = await store_pulled(self._pool, self._mailbox, batch, claimed) if batch else []
        if previous is not None:
            await previous   # raises what it raised: nothing of ours is published after a failure
        ingested = await announce_stored(self._publisher, self._mailbox, "imap", stored)
        await self._save(folder, status, highest, modseq, ingested, _found_again(batch, stored), vanished=last)
        return len(ingested)

    async def _save(self, folder: str, status: FolderState, last_uid: int, modseq: int | None,
                    ingested: list[state.IngestedMessage], found_again: list[tuple[str, int]], *,
                    vanished: bool = True) -> None:
        """One transaction: what a batch ingested, what vanished (with ``vanished``) and the state
        that says both are done."""
        async with self._pool.acquire() as conn, conn.transaction():
            await state.record_ingested(conn, self._mailbox.id, ingested, status.uidvalidity)
            await state.renumber_ingested(conn, self._mailbox.id, folder, status.uidvalidity, found_again)
            if vanished and status.vanished:
                gone = await state.mark_vanished(conn, self._mailbox.id, folder, status.uidvalidity, status.vanished)
                if gone:
                    log.info("mailbox %s folder %s: %d ingested messages no longer on the server",
                             self._mailbox.id, folder, gone)
            await state.save_folder_state(conn, self._mailbox.id, folder,
                                          state.FolderSyncState(status.uidvalidity, last_uid, modseq))

    async def remove_processed(self, client: ImapClient) -> int:
        """Queues that delete after processing: expunge what evaluate has durably decided on."""
        async with self._pool.acquire() as conn:
            done = await state.deletable(conn, self._mailbox.id)
        by_folder: dict[str, list[state.IngestedMessage]] = {}
        for item in done:
            if item.folder and item.uid:
                by_folder.setdefault(item.folder, []).append(item)
        removed = 0
        for folder, items in by_folder.items():
            status = await client.select(folder, readonly=False)
            # A UID of an earlier numbering may now name another message: such rows wait until the
            # folder's resync finds their message again under its new UID.
            items = [i for i in items if i.uidvalidity in (None, status.uidvalidity)]
            if not items:
                continue
            uids = [i.uid for i in items if i.uid is not None]
            await client.mark_deleted(uids)
            await client.expunge(uids)
            async with self._pool.acquire() as conn:
                await state.mark_removed(conn, self._mailbox.id, [i.message_key for i in items])
            removed += len(items)
        return removed


def _found_again(batch: Sequence[Pulled], stored: Sequence[Stored]) -> list[tuple[str, int]]:
    """(key, UID) of the batch's messages that were not new: already ingested, maybe under another
    UIDVALIDITY.  Usually none, so the keys are worked out again only for those few."""
    if len(stored) == len(batch):
        return []
    new = {id(entry.item) for entry in stored}
    return [(message_key(p.raw), p.uid) for p in batch if id(p) not in new and p.uid is not None]
