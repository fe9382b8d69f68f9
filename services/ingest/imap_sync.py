"""Synchronise one mailbox's tracked IMAP folders into raw storage and `email.received`.

Per folder, the state persisted after each batch (UIDVALIDITY, highest UID seen, HIGHESTMODSEQ)
makes a restart resume exactly.  A UIDVALIDITY change means the server renumbered the folder: the
folder is read again from the start, and the per-mailbox record of ingested Message-IDs keeps that
from producing duplicates (it also keeps a message moved between tracked folders from being
processed twice).

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
from services.ingest.imap_client import ImapClient, ImapCommandFailed
from services.ingest.publishing import Mailbox, Pulled, announce_stored, store_pulled
from shared.kafka import Publisher

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

    async def sync(self, client: ImapClient, folders: Sequence[str]) -> int:
        """Sync each folder once; return the number of new messages published."""
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
        status = await client.select(folder, readonly=not self._delete)
        async with self._pool.acquire() as conn:
            saved = await state.folder_state(conn, self._mailbox.id, folder)
        last_uid = 0
        if saved is not None:
            if saved.uidvalidity == status.uidvalidity:
                last_uid = saved.last_uid
            else:
                log.warning("mailbox %s folder %s: UIDVALIDITY changed %d -> %d, resynchronising",
                            self._mailbox.id, folder, saved.uidvalidity, status.uidvalidity)
        if saved is not None and last_uid and status.uidnext - 1 <= last_uid:
            return 0  # nothing arrived since: no SEARCH, no FETCH (the common case when polling)
        uids = await client.uids_since(last_uid)
        if not uids:
            await self._save(folder, status.uidvalidity, last_uid, status.highestmodseq, [])
            return 0
        flushes: list[asyncio.Task[int]] = []
        claimed: set[str] = set()   # keys stored by a batch of this sync, not yet recorded as ingested
        batch: list[Pulled] = []
        highest = last_uid

        async def flush() -> None:
            if len(flushes) >= IN_FLIGHT:
                await flushes[-IN_FLIGHT]   # raises what it raised, and then nothing more is published
            previous = flushes[-1] if flushes else None
            flushes.append(asyncio.create_task(self._flush(
                folder, status.uidvalidity, highest, status.highestmodseq, batch, claimed, previous)))

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
            await flush()
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

    async def _flush(self, folder: str, uidvalidity: int, highest: int, modseq: int | None, batch: list[Pulled],
                     claimed: set[str], previous: asyncio.Task[int] | None) -> int:
        """One batch: raw stored (while the previous batch is published and saved), then, once the
        previous batch is done, events published and acknowledged, then the folder state saved."""
        stored = await store_pulled(self._pool, self._mailbox, batch, claimed) if batch else []
        if previous is not None:
            await previous   # raises what it raised: nothing of ours is published after a failure
        ingested = await announce_stored(self._publisher, self._mailbox, "imap", stored)
        await self._save(folder, uidvalidity, highest, modseq, ingested)
        return len(ingested)

    async def _save(self, folder: str, uidvalidity: int, last_uid: int, modseq: int | None,
                    ingested: list[state.IngestedMessage]) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await state.record_ingested(conn, self._mailbox.id, ingested)
            await state.save_folder_state(conn, self._mailbox.id, folder, state.FolderSyncState(uidvalidity, last_uid, modseq))

    async def remove_processed(self, client: ImapClient) -> int:
        """Queues that delete after processing: expunge what evaluate has durably decided on."""
        async with self._pool.acquire() as conn:
            done = await state.deletable(conn, self._mailbox.id)
        by_folder: dict[str, list[state.IngestedMessage]] = {}
        for item in done:
            if item.folder and item.uid:
                by_folder.setdefault(item.folder, []).append(item)
        for folder, items in by_folder.items():
            await client.select(folder, readonly=False)
            uids = [i.uid for i in items if i.uid is not None]
            await client.mark_deleted(uids)
            await client.expunge(uids)
            async with self._pool.acquire() as conn:
                await state.mark_removed(conn, self._mailbox.id, [i.message_key for i in items])
        return sum(len(v) for v in by_folder.values())
