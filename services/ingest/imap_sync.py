"""Synchronise one mailbox's tracked IMAP folders into raw storage and `email.received`.

Per folder, the state persisted after each batch (UIDVALIDITY, highest UID seen, HIGHESTMODSEQ)
makes a restart resume exactly.  A UIDVALIDITY change means the server renumbered the folder: the
folder is read again from the start, and the per-mailbox record of ingested Message-IDs keeps that
from producing duplicates (it also keeps a message moved between tracked folders from being
processed twice, except into a folder a folder-level tracking rule maps: ``_refiled``); messages found
again take their new UIDs.

Where the server offers QRESYNC (RFC 7162), the folder is opened with the saved UIDVALIDITY and
HIGHESTMODSEQ and the server's answer to that one command says what happened since: an unchanged
HIGHESTMODSEQ means nothing did (no SEARCH, no FETCH, no write), and the UIDs it reports vanished
are recorded as no longer on the server.  The saved HIGHESTMODSEQ only moves in the transaction that
records everything it stands for (the last batch, and the vanished UIDs), so a restart asks the
server again for whatever was not recorded.  Without QRESYNC (CONDSTORE only, or neither) new mail
is found from UIDNEXT as before, and expunges by others go unnoticed.

A folder-level tracking rule added to a folder ingest has read already is *onboarded* at the next
sync of that folder (``_onboard``), once per rule: the messages read from the folder before, up to
the saved state, that the server says are still there (one UID FETCH of flags and arrival times a
batch, no content) are announced again, marked ``refiled``, so evaluate files them under the rule's
record; its progress is recorded on the rule, in a transaction after each batch's events are
acknowledged.  A folder read from its start (renumbered, or new to ingest) needs no such asking: the
messages found again in it that were read from it before are announced again as they are found.

Only a refused SELECT/EXAMINE makes a folder "missing".  A UID FETCH the server refuses (Gmail
does, for single messages) is narrowed down to the UIDs it refuses (``ImapClient.fetch_servable``);
what it did serve, before and after them, is ingested, while the saved state stays below the lowest
refused UID.  A UID FETCH answered OK whose response for a UID carries no content (``BODY[] NIL``, or
no body item) refuses that UID just the same: it is no message (stored and published as an empty one
it would be a junk activity), and the state must not pass it.  A UID reported expunged during the
answer is gone and refuses nothing; one the answer does not name at all (or names only in a response
without its UID) is gone if a ``UID SEARCH`` then no longer finds it, and refused if the server still
has it (``_check_not_served``).  Each refusal is counted (``refused_message``) and named in a
warning; once refused in ``state.REFUSALS_BEFORE_SKIP`` syncs a UID is skipped, named again, and the
state moves past it.  A refusal that is no message's fault skips nothing: the folder's sync fails
instead (a ``folder_sync_failed`` warning) and is tried again at the next sync.  That is a refusal
the server marks temporary or answers with BAD, and a sync in which the server served nothing and
refused more than one message (Dovecot's ``NO [SERVERBUG]`` on a storage failure).  Where the profile moves failed email to
an Undeliverable folder, a skipped message is then moved there (``move_undeliverable``).

Batches are pipelined: while one batch's events are published and its state saved, the next
batch's raw bytes are stored and the one after is read from the server.  Each batch still goes raw
stored -> events acknowledged -> state saved, and a batch is published only after the previous
batch's state is saved, so the saved state never runs ahead of acknowledged events and events keep
the folder's order.

A runner that is to stop (its mailbox deactivated or edited, its lease lost, ingest stopping) sets
``stopping``: the sync then reads no further than the messages the server has sent so far.  Those
are stored, published and saved as one more batch, the batches in flight finish as usual, and the
next session goes on from the saved state; the folders not reached yet and a rule's onboarding not
finished wait for it too.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import aclosing
from datetime import datetime

import asyncpg

from services.ingest import leases, state
from services.ingest.imap_client import (
    FolderState,
    FolderUnavailable,
    ImapClient,
    ImapCommandFailed,
    KnownFolder,
)
from services.ingest.publishing import (
    BATCH_BYTES,
    Mailbox,
    Pulled,
    Stored,
    announce_stored,
    ingest_key,
    same_message,
    store_pulled,
)
from shared.kafka import Publisher
from shared.registry.models import is_inbox

log = logging.getLogger(__name__)

BATCH = 500
# Batches between fetched and state saved: one being published and saved, one being stored.
IN_FLIGHT = 2
# Where the profile's "move failed email to an Undeliverable folder" puts the messages ingest gave up on.
UNDELIVERABLE_FOLDER = "Undeliverable"


class ImapFolderSync:
    def __init__(self, pool: asyncpg.Pool, publisher: Publisher, mailbox: Mailbox, *,
                 received_after: datetime | None = None, delete_after_processing: bool = False,
                 undeliverable: str | None = None, stopping: asyncio.Event | None = None) -> None:
        self._pool = pool
        self._publisher = publisher
        self._mailbox = mailbox
        self._received_after = received_after
        self._delete = delete_after_processing
        self._undeliverable = undeliverable   # the folder for messages given up on; None: they stay
        self._stopping = stopping   # set: the runner is to stop, the sync ends after the batch in flight
        self.missing_folders: set[str] = set()
        # (code, text) of warnings for the mailbox's alerts; the runner raises and clears them.
        self.warnings: list[tuple[str, str]] = []

    @property
    def deletes_processed(self) -> bool:
        """A queue mailbox that deletes mail from the server once its activity is durable."""
        return self._delete

    def _stopped(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()

    async def sync(self, client: ImapClient, folders: Sequence[str]) -> int:
        """Sync each folder once; return the number of new messages published."""
        await client.enable_quick_resync()   # first thing after login: ENABLE wants no folder selected
        if self._delete:
            await self.remove_processed(client)
        if self._undeliverable:
            # Before the folders' sync, not after: the session must end with the Inbox selected, the
            # folder an idling session watches.  What is skipped in this sync moves at the next one.
            await self.move_undeliverable(client, folders)
        published = 0
        for folder in folders:
            if self._stopped():
                break
            try:
                published += await self.sync_folder(client, folder)
            except FolderUnavailable as exc:
                # A tracked folder the server does not have: the others still sync; the runner
                # raises a warning alert once, and the log says it once a session (an idling
                # session looks again at every polling interval).
                level = logging.DEBUG if folder in self.missing_folders else logging.WARNING
                self.missing_folders.add(folder)
                log.log(level, "mailbox %s: folder %r cannot be read: %s", self._mailbox.id, folder, exc.message)
            except ImapCommandFailed as exc:
                # The folder exists but the server refused a command in it (a NO leaves the session
                # usable): what was saved stays saved, the next sync tries again, the others sync now.
                self.warnings.append(("folder_sync_failed", f"the folder {folder!r} could not be synced: {exc.message}"))
                log.warning("mailbox %s: folder %r could not be synced: %s", self._mailbox.id, folder, exc.message)
        return published

    async def sync_folder(self, client: ImapClient, folder: str) -> int:
        await client.enable_quick_resync()   # a no-op after the first call of the session
        async with self._pool.acquire() as conn:
            saved, onboarding = await state.folder_sync_start(conn, self._mailbox.id, folder)
        if self._mailbox.is_forward_mailbox:
            onboarding = None   # no rules there (its folders hold many users' mail), as for ``_refiled``
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
        # While the folder's rule is not onboarded, a message found again in the folder that was read
        # from it under an earlier numbering is mail from before the rule: announced again too.
        earlier_numbering = status.uidvalidity if onboarding is not None else None
        # A read of the folder from its start (renumbered) that was cut short records its rule's
        # progress with the state, as far as the state: it goes on below, and ends the onboarding
        # at its end.  Asking the server (``_onboard``) would find nothing up to the state, and end
        # the onboarding before the rest of the folder's earlier mail was found again.
        resuming = (onboarding is not None and saved is not None and not renumbered
                    and onboarding.uidvalidity == status.uidvalidity and onboarding.uid >= saved.last_uid)
        if onboarding is not None and saved is not None and not renumbered and not resuming:
            # The folder's new rule files what ingest read from the folder before it (and what a move
            # brought there), up to the saved state; what comes after is read below, as always.
            try:
                await self._onboard(client, folder, status, saved.last_uid, onboarding)
                onboarding = None
            except ImapCommandFailed as exc:
                # Refused (a NO leaves the session usable): the folder's new mail is read all the
                # same, and the onboarding is tried again at the next sync.
                text = f"the folder {folder!r}'s tracking rule could not file its earlier mail yet: {exc.message}"
                self.warnings.append(("folder_sync_failed", text))
                log.warning("mailbox %s: %s", self._mailbox.id, text)
                onboarding = earlier_numbering = None
            if self._stopped():
                return 0   # stopping: the rest of the onboarding, and the folder's new mail, wait for the next session
        if saved is not None and not renumbered and status.uidnext - 1 <= last_uid:
            # Nothing arrived since: no SEARCH, no FETCH (the common case when polling).  With
            # QRESYNC a new HIGHESTMODSEQ means flags changed or mail vanished: recorded, still no I/O.
            if onboarding is not None:   # a read from the start, cut short after its last message
                await self._save(folder, status, last_uid, status.highestmodseq, [], [], refused={},
                                 onboarding=onboarding)
            elif status.quick_resync and status.highestmodseq != saved_modseq:
                await self._save(folder, status, last_uid, status.highestmodseq, [], [])
            return 0
        uids = await client.uids_since(last_uid)
        highest = last_uid
        if uids:
            async with self._pool.acquire() as conn:
                skipped = await state.skipped_uids(conn, self._mailbox.id, folder, status.uidvalidity, uids[0])
            if skipped:
                # Skipped after repeated refusals: not asked for again, and the sync's end may pass them.
                highest = max(u for u in uids if u in skipped)
                uids = [u for u in uids if u not in skipped]
        if not uids:
            await self._save(folder, status, highest, status.highestmodseq, [], [], refused={}, onboarding=onboarding)
            return 0
        flushes: list[asyncio.Task[int]] = []
        claimed: set[str] = set()   # keys stored by a batch of this sync, not yet recorded as ingested
        batch: list[Pulled] = []
        batch_bytes = 0
        refused: dict[int, str] = {}   # UID -> the server's refusal or contentless answer (filled by fetch_servable)
        # ``settled``: every UID up to it was fetched (or is skipped or gone).  A batch saves that,
        # not the highest UID fetched: a refused message may lie below later ones already fetched,
        # and the saved state must not pass a message that was neither ingested nor skipped.
        served: set[int] = set()
        unserved = 0   # index in ``uids`` of the first UID not yet fetched
        cut_short = False   # the runner is stopping: the rest of the folder waits for the next session

        async def flush(*, last: bool = False) -> None:
            if len(flushes) >= IN_FLIGHT:
                await flushes[-IN_FLIGHT]   # raises what it raised, and then nothing more is published
            previous = flushes[-1] if flushes else None
            # Batches before the last keep the modseq already saved: the new one also stands for
            # the vanished UIDs and later messages, which only the last batch's save records.
            modseq = status.highestmodseq if last else saved_modseq
            settled = highest if unserved == len(uids) else max(last_uid, uids[unserved] - 1)
            flushes.append(asyncio.create_task(self._flush(
                folder, status, highest if last else settled, modseq, batch, claimed, previous,
                refused if last else None, onboarding, earlier_numbering)))

        try:
            async with aclosing(client.fetch_servable(uids, refused, chunk=BATCH)) as fetched:
                async for messages in fetched:
                    for message in messages:
                        highest = max(highest, message.uid)
                        served.add(message.uid)
                        while unserved < len(uids) and uids[unserved] in served:
                            served.discard(uids[unserved])
                            unserved += 1
                        if self._received_after and message.internaldate and message.internaldate < self._received_after:
                            continue  # "process email received after": older mail is skipped, never fetched again
                        batch.append(Pulled(message.raw, folder, message.uid, None, message.internaldate))
                        batch_bytes += len(message.raw)
                        if len(batch) >= BATCH or batch_bytes >= BATCH_BYTES:
                            await flush()
                            batch, batch_bytes = [], 0
                    if self._stopped():
                        # What was read is a batch like the others (saved up to ``settled``); the
                        # answers to the commands in flight are read and dropped as the fetch closes.
                        log.info("mailbox %s folder %s: stopping; the rest of the folder is read at the next session",
                                 self._mailbox.id, folder)
                        cut_short = True
                        break
            if not cut_short:
                await self._check_not_served(client, uids[unserved:], served, refused,
                                             nothing_served=not unserved and not served)
            await flush(last=not cut_short)
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

    async def _check_not_served(self, client: ImapClient, rest: list[int], served: set[int],
                                refused: dict[int, str], *, nothing_served: bool) -> None:
        """At the end of a folder's fetch (``rest``: the UIDs asked for from the first one not served
        on, ``served``: those of them served): a UID the answers did not name, neither served nor
        refused, is gone unless the server still has it (one ``UID SEARCH``); a message it has but
        left out of its answer (a FETCH response without the UID, say) is refused, so the state
        stays below it.  Then, when nothing at all was served (``nothing_served``) and more than one
        UID was refused, the server refused everything (Dovecot's ``NO [SERVERBUG]`` for a storage
        failure): a fault of the server's, not of the messages, so no refusal is counted and the
        folder's sync fails (``ImapCommandFailed``, a ``folder_sync_failed`` warning), tried again at
        the next sync."""
        unnamed = [uid for uid in rest if uid not in served and uid not in refused]
        if unnamed:
            for uid in sorted(await client.uids_present(unnamed)):
                refused[uid] = "The IMAP server left the message out of its answer to UID FETCH, yet still has it."
        if nothing_served and len(refused) > 1:
            count, reason = len(refused), refused[min(refused)]
            refused.clear()
            raise ImapCommandFailed(f"The IMAP server refused {count} messages and served none, a fault of "
                                    f"the server's, not of those messages (it said: {reason.rstrip('.')}).")

    async def _flush(self, folder: str, status: FolderState, highest: int, modseq: int | None,
                     batch: list[Pulled], claimed: set[str], previous: asyncio.Task[int] | None,
                     refused: dict[int, str] | None, onboarding: state.RuleOnboarding | None = None,
                     earlier_numbering: int | None = None) -> int:
        """One batch: raw stored (while the previous batch is published and saved), then, once the
        previous batch is done, events published and acknowledged, then the folder state saved.
        The last batch of a sync carries ``refused`` (the other batches None).  ``onboarding``: the
        folder is read from its start while its rule's onboarding is not done (``_onboard``);
        ``earlier_numbering``: see ``_refiled``'s ``renumbered_to``."""
        stored = await store_pulled(self._pool, self._mailbox, batch, claimed) if batch else []
        found_again = _found_again(self._mailbox, batch, stored)
        refiled = await self._refiled(folder, found_again, renumbered_to=earlier_numbering)
        if previous is not None:
            await previous   # raises what it raised: nothing of ours is published after a failure
        ingested = await announce_stored(self._publisher, self._mailbox, "imap", stored)
        # Before the save that records the new place: a crash in between announces it again, and
        # evaluate's folder rule decides the same way twice.
        await announce_stored(self._publisher, self._mailbox, "imap", refiled, refiled=True)
        await self._save(folder, status, highest, modseq, ingested, found_again,
                         vanished=refused is not None, refused=refused, onboarding=onboarding)
        return len(ingested)

    async def _refiled(self, folder: str, found_again: list[tuple[str, Pulled]], *,
                       renumbered_to: int | None = None) -> list[Stored]:
        """Messages ingested from another folder and found now in ``folder``, which a folder-level
        tracking rule maps to a record: moved (or copied) there by the user or a server rule.  They
        are announced again from here, so evaluate tracks them regarding the folder's record, as the
        reference does; a message that only reuses the Message-ID of one ingested is not.  With
        ``renumbered_to`` (the rule's onboarding, when the folder is read again from its start), also
        the messages read from ``folder`` itself before, under another UIDVALIDITY."""
        if not found_again or self._mailbox.is_forward_mailbox or is_inbox(folder):
            return []
        async with self._pool.acquire() as conn:
            filed = await state.filed_elsewhere(conn, self._mailbox.id, folder, [key for key, _ in found_again],
                                                renumbered_to=renumbered_to)
            if not filed:
                return []
            pulled = {key: item for key, item in found_again if key in filed}
            same = await same_message(conn, self._mailbox.id, [
                (state.IngestedMessage(key, "", folder, item.uid, None), item.raw) for key, item in pulled.items()])
        # A mailbox that is no forward mailbox keys a message by its Message-ID alone.
        return [Stored(p.message_key, filed[p.message_key], pulled[p.message_key], p.message_key, None) for p in same]

    async def _save(self, folder: str, status: FolderState, last_uid: int, modseq: int | None,
                    ingested: list[state.IngestedMessage], found_again: list[tuple[str, Pulled]], *,
                    vanished: bool = True, refused: dict[int, str] | None = None,
                    onboarding: state.RuleOnboarding | None = None) -> None:
        """One transaction: what a batch ingested, what vanished (with ``vanished``) and the state
        that says both are done.  With ``refused`` (the end of a sync that asked for every UID past
        the saved state): the refusals are counted, and the state stops below the lowest refused
        UID not yet skipped.  With ``onboarding`` (the folder read from its start while its rule's
        onboarding is not done): the onboarding has come as far as the state, and is done at the end."""
        async with self._pool.acquire() as conn, conn.transaction():
            await leases.hold(conn, self._mailbox.id, self._mailbox.lease_holder)
            await state.record_ingested(conn, self._mailbox.id, ingested, status.uidvalidity)
            found = [(state.IngestedMessage(key, "", folder, item.uid, None, status.uidvalidity), item.raw)
                     for key, item in found_again]
            # Only the ingested message itself may take its record's place (which a queue that
            # deletes after processing, now or once it is set to, deletes by), not another message
            # that reuses its Message-ID (a scanner's fixed one, a forged one).
            places = await same_message(conn, self._mailbox.id, found)
            await state.renumber_ingested(conn, self._mailbox.id, folder, status.uidvalidity,
                                          [(p.message_key, p.uid) for p in places], copies_elsewhere=self._delete)
            if self._delete and places:
                # Further copies of a message (delivered twice) go with it once it is processed.
                await state.record_copies(conn, self._mailbox.id, places)
            if vanished and status.vanished:
                gone = await state.mark_vanished(conn, self._mailbox.id, folder, status.uidvalidity, status.vanished)
                if gone:
                    log.info("mailbox %s folder %s: %d ingested messages no longer on the server",
                             self._mailbox.id, folder, gone)
            if refused is not None:
                counted = await state.count_refusals(conn, self._mailbox.id, folder, status.uidvalidity,
                                                     {str(uid): text for uid, text in refused.items()})
                waiting = [int(r.server_id) for r in counted if not r.skipped]
                if waiting:
                    last_uid = min(last_uid, min(waiting) - 1)
            await state.save_folder_state(conn, self._mailbox.id, folder,
                                          state.FolderSyncState(status.uidvalidity, last_uid, modseq))
            if onboarding is not None:
                await state.onboarding_progress(conn, self._mailbox.id, folder, onboarding, status.uidvalidity,
                                                last_uid, done=refused is not None)
        if refused:
            for code, text in state.refusal_warnings(counted, "UID", f"of the folder {folder!r}"):
                log.warning("mailbox %s: %s", self._mailbox.id, text)
                self.warnings.append((code, text))

    async def _onboard(self, client: ImapClient, folder: str, status: FolderState, through_uid: int,
                       onboarding: state.RuleOnboarding) -> int:
        """The onboarding of the folder's new rule (the reference files the mail already in a folder
        when its rule is added): the messages ingest read from ``folder`` before, up to the saved
        state (``through_uid``), and that the server says are still there, are announced again from
        the folder (``refiled``), so evaluate files them under the rule's record.  Asking the server
        matters: without QRESYNC (Gmail, Exchange) ingest never learns of mail deleted or moved out
        since, and filing it would put mail the user threw away into the CRM.  A batch at a time:
        ``BATCH`` rows read, one UID FETCH of their flags and arrival times (no content: the raw
        bytes are stored already), their events acknowledged, then the progress recorded, so memory
        stays bounded and a crash repeats at most the batch in flight.  Returns how many were announced."""
        after = onboarding.uid if onboarding.uidvalidity == status.uidvalidity else 0
        announced = 0
        while True:
            async with self._pool.acquire() as conn, conn.transaction():
                await leases.hold(conn, self._mailbox.id, self._mailbox.lease_holder)
                read = await state.read_before(conn, self._mailbox.id, folder, status.uidvalidity, after,
                                               through_uid, BATCH)
            done = len(read) < BATCH
            if read:
                there = await client.still_there([r.uid for r in read])
                again = [Stored(r.message_key, r.raw_sha256, Pulled(b"", folder, r.uid, None, there[r.uid]),
                                r.message_key, None, r.size) for r in read if r.uid in there]
                await announce_stored(self._publisher, self._mailbox, "imap", again, refiled=True)
                announced += len(again)
                after = read[-1].uid
            async with self._pool.acquire() as conn, conn.transaction():
                await leases.hold(conn, self._mailbox.id, self._mailbox.lease_holder)
                await state.onboarding_progress(conn, self._mailbox.id, folder, onboarding, status.uidvalidity,
                                                after, done=done)
            if done:
                log.info("mailbox %s folder %s: the folder's tracking rule files %d message(s) read from it before",
                         self._mailbox.id, folder, announced)
                return announced
            if self._stopped():
                return announced   # its progress is recorded: the next session goes on from there

    async def remove_processed(self, client: ImapClient) -> int:
        """Queues that delete after processing: expunge what became a durable activity.

        A folder the server refuses to open (deleted or renamed since) or whose messages it
        refuses to flag or expunge is passed over with a warning, and the sync goes on: a removal
        that cannot be done never holds up new mail.  Its rows stay as they are (not removed), so
        each session tries again, at the cost of one refused command: the folder may come back, and
        a message found again in another tracked folder is recorded there as a further copy
        (``state.record_copies``), and removed there."""
        async with self._pool.acquire() as conn:
            done = await state.deletable(conn, self._mailbox.id, lease_holder=self._mailbox.lease_holder)
        by_folder: dict[str, list[state.IngestedMessage]] = {}
        for item in done:
            if item.folder and item.uid:
                by_folder.setdefault(item.folder, []).append(item)
        removed = 0
        for folder, items in by_folder.items():
            try:
                removed += await self._remove_from(client, folder, items)
            except ImapCommandFailed as exc:
                log.warning("mailbox %s: %d processed messages left in the folder %r: %s",
                            self._mailbox.id, len(items), folder, exc.message)
        return removed

    async def move_undeliverable(self, client: ImapClient, folders: Sequence[str]) -> int:
        """Move the messages skipped after repeated refusals out of the tracked ``folders`` into the
        Undeliverable folder (created when missing), where their owner sees they were not tracked;
        return how many moved.  A refused move is a warning, tried again at the next session."""
        assert self._undeliverable is not None
        async with self._pool.acquire() as conn:
            skipped = await state.undeliverable(conn, self._mailbox.id, lease_holder=self._mailbox.lease_holder)
        moved = 0
        for (folder, uidvalidity), uids in skipped.items():
            if folder not in folders or folder == self._undeliverable:
                continue   # no longer tracked, or already where it would go
            try:
                status = await client.select(folder, readonly=False)
                if status.uidvalidity != uidvalidity:
                    continue   # renumbered: those UIDs name nothing now, and the resync refuses anew
                copied = await client.move(uids, self._undeliverable)
            except ImapCommandFailed as exc:   # the folder gone too, or the server refusing the move
                self._undeliverable_warning(f"{len(uids)} message(s) given up on could not be moved to "
                                            f"{self._undeliverable!r}: {exc.message}")
                continue
            # Recorded as soon as the copy is there: a removal that fails below is not a reason to
            # copy them again at every session.
            async with self._pool.acquire() as conn:
                await state.mark_moved(conn, self._mailbox.id, folder, uidvalidity, uids)
            if copied:
                try:
                    await client.remove(uids)
                except ImapCommandFailed as exc:
                    self._undeliverable_warning(f"{len(uids)} message(s) given up on were copied to "
                                                f"{self._undeliverable!r} but stay in {folder!r}: {exc.message}")
            log.info("mailbox %s: %d message(s) given up on moved from %r to %r", self._mailbox.id, len(uids),
                     folder, self._undeliverable)
            moved += len(uids)
        return moved

    def _undeliverable_warning(self, text: str) -> None:
        log.warning("mailbox %s: %s", self._mailbox.id, text)
        self.warnings.append(("undeliverable_not_moved", text))

    async def _remove_from(self, client: ImapClient, folder: str, items: list[state.IngestedMessage]) -> int:
        status = await client.select(folder, readonly=False)
        # A UID of an earlier numbering may now name another message: such rows wait until the
        # folder's resync finds their message again under its new UID.
        current = [i for i in items if i.uidvalidity in (None, status.uidvalidity)]
        if len(current) < len(items):
            # Further copies are found again, and recorded anew, by the resync itself.
            async with self._pool.acquire() as conn:
                await state.forget_renumbered_copies(conn, self._mailbox.id, folder, status.uidvalidity)
        if not current:
            return 0
        uids = [i.uid for i in current if i.uid is not None]
        await client.remove(uids)
        async with self._pool.acquire() as conn:
            await state.mark_removed(conn, self._mailbox.id, current)
        return len(current)


def _found_again(mailbox: Mailbox, batch: Sequence[Pulled], stored: Sequence[Stored]) -> list[tuple[str, Pulled]]:
    """(key, message) of the batch's messages that were not new: already ingested, maybe under
    another UIDVALIDITY or in another folder.  Usually none, so the keys are worked out again only
    for those few."""
    if len(stored) == len(batch):
        return []
    new = {id(entry.item) for entry in stored}
    return [(ingest_key(mailbox, p.raw)[0], p) for p in batch if id(p) not in new and p.uid is not None]
