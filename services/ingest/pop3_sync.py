"""Synchronise one POP3 mailbox: UIDL bookkeeping says what is new; queues that delete after
processing remove (DELE, committed by QUIT) what became a durable activity.

A message the server refuses to hand over (-ERR to RETR), or one LIST gives as larger than Conduit
reads (``wire.MAX_MESSAGE_BYTES``), does not stop the messages after it: they are retrieved, and the
refused one is asked for again at the next syncs (its UIDL is not recorded as seen) and skipped,
with a warning naming its UIDL, once refused ``state.REFUSALS_BEFORE_SKIP`` times.  A session in
which the server refused every message it was asked for (more than one) and served none counts no
refusal: that is the server failing (a storage outage answered by a bare "-ERR"), not each message,
and the session fails, to be tried again.  A message that seems to have ended early (the reply after
it out of step, ``pop3_client.OutOfStep``) is not stored, and counts as refused; the session ends.

A message whose UIDL line breaks RFC 1939 (``Pop3Client.uidl``) is not kept track of, so never
ingested nor deleted: a warning names it at every session, and the others are synced.

A UIDL should name one message for ever (RFC 1939 section 7), but a server can list it twice
(Dovecot with ``pop3_reuse_xuidl``, which takes a message's X-UIDL header, and its default
``pop3_uidl_duplicates = allow``).  Then each message still gets an id of its own for this
bookkeeping (``listing_ids``), so every one is ingested, and none of them is ever deleted: a DELE
by that UIDL could name another message than the one processed.

A runner that is to stop sets ``stopping``: the session then retrieves no further than the batch in
flight, which is stored, published and recorded as seen, and it deletes nothing (what QUIT would
commit waits for the next session, which retrieves the rest).  The bookkeeping of the listing
(``state.forget_pop3_uidls``) is done all the same: it stands for the whole listing, not for what
was retrieved, and a deletion later relies on it."""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from uuid import UUID

import asyncpg

from services.ingest import leases, state
from services.ingest.pop3_client import MessageTooLarge, OutOfStep, Pop3Client, RetrRefused
from services.ingest.publishing import BATCH_BYTES, Mailbox, Pulled, ingest_key, publish_pulled, same_message
from services.ingest.wire import MAX_MESSAGE_BYTES
from shared.errors import ConduitError, TransientError
from shared.kafka import Publisher

log = logging.getLogger(__name__)

BATCH = 200


def listing_ids(listing: dict[int, str], sizes: dict[int, int]) -> tuple[dict[int, str], set[str]]:
    """(message number -> the id Conduit keeps track of it by, the UIDLs listed more than once).

    A UIDL listed once is its own id.  Of a UIDL listed more than once, the first message (listing
    order) keeps it, and each further one is told apart by its LIST size: ``"<uidl> #<size>"``
    (``".2"``, ``".3"`` ... added for further ones of the same size).  A UIDL holds no space (RFC
    1939: 0x21-0x7E), so such an id is never a real UIDL.  The size rather than the position
    keeps an id with its message when another one of the group leaves and a new one comes between
    two sessions; a message that moves to the first place was ingested already under its own id."""
    counts = Counter(listing.values())
    repeated = {uidl for uidl, count in counts.items() if count > 1}
    if not repeated:
        return listing, repeated
    ids: dict[int, str] = {}
    taken: set[str] = set()
    for number, uidl in sorted(listing.items()):
        if uidl not in repeated or uidl not in taken:
            ids[number] = uidl
        else:
            base = f"{uidl} #{sizes.get(number, '?')}"
            candidate, n = base, 1
            while candidate in taken:
                n += 1
                candidate = f"{base}.{n}"
            ids[number] = candidate
        taken.add(ids[number])
    return ids, repeated


class Pop3Sync:
    # Mailboxes whose repeated UIDLs were logged by this process (once each: they stay on the server).
    _repeats_logged: set[UUID] = set()

    def __init__(self, pool: asyncpg.Pool, publisher: Publisher, mailbox: Mailbox, *, delete_after_processing: bool = False,
                 stopping: asyncio.Event | None = None) -> None:
        self._pool = pool
        self._publisher = publisher
        self._mailbox = mailbox
        self._delete = delete_after_processing
        self._stopping = stopping   # set: the runner is to stop, the session ends after the batch in flight
        self._awaiting_quit: list[state.IngestedMessage] = []
        # (code, text) of warnings for the mailbox's alerts; the runner raises and clears them.
        self.warnings: list[tuple[str, str]] = []

    async def sync(self, client: Pop3Client) -> int:
        listing = await client.uidl()
        if client.untracked_uidl_lines:
            self._warn_untracked(client.untracked_uidl_lines)
        async with self._pool.acquire() as conn:
            seen = await state.pop3_seen(conn, self._mailbox.id)
        # LIST only when it is needed: for the sizes of messages to retrieve, or to tell apart the
        # messages of a repeated UIDL.  A poll that finds nothing new costs no LIST.
        repeated_uidls = len(set(listing.values())) < len(listing)
        sizes = await client.sizes() if repeated_uidls or any(u not in seen for u in listing.values()) else {}
        ids, repeated = listing_ids(listing, sizes)
        if repeated:
            self._log_repeats(repeated)
        new = [(n, i) for n, i in sorted(ids.items()) if i not in seen]
        refused: dict[str, str] = {}   # id -> the server's refusal, or why Conduit refuses it
        for number, message_id in new:
            if sizes.get(number, 0) > MAX_MESSAGE_BYTES:
                refused[message_id] = (f"{sizes[number]} octets, more than the {MAX_MESSAGE_BYTES // 2**20} MiB "
                                       "Conduit reads as one message")
        too_large = set(refused)
        published = retrieved = 0
        id_of = dict(new)
        batch: list[Pulled] = []
        batch_bytes = 0
        numbers = [n for n, i in new if i not in refused]
        try:
            while numbers and not self._stopped():
                # A batch's worth of RETRs at a time: a stopping session ends between them (the
                # replies to RETRs already sent must be read before QUIT).
                asked = numbers[:BATCH]
                try:
                    async for number, raw in client.retr_many(asked):
                        retrieved += 1
                        batch.append(Pulled(raw, None, None, id_of[number]))
                        batch_bytes += len(raw)
                        if len(batch) >= BATCH or batch_bytes >= BATCH_BYTES:
                            published += await self._flush(batch)
                            batch, batch_bytes = [], 0
                    numbers = numbers[len(asked):]
                except RetrRefused as exc:
                    if exc.temporary:
                        raise
                    refused[id_of[exc.number]] = exc.message
                    if isinstance(exc, MessageTooLarge):
                        # The rest of that reply is still coming: the session cannot go on.  The
                        # refusal is counted, so the message is skipped after as many sessions.
                        await self._count_refusals(refused)
                        raise
                    numbers = numbers[numbers.index(exc.number) + 1:]
                except OutOfStep as exc:
                    if exc.suspect is not None:
                        # Counted, like a message larger than listed: a server that never stuffs
                        # it is skipped past after as many sessions, not stuck on it for ever.
                        refused[id_of[exc.suspect]] = exc.message
                        await self._count_refusals(refused)
                    raise
        except ConduitError as exc:
            # A failed session keeps what it retrieved before the failure (a session that lost its
            # lease records nothing more).
            if not isinstance(exc, leases.LeaseLost):
                await self._flush(batch)
            raise
        published += await self._flush(batch)
        if numbers:
            # Stopping: refusals are counted only by a session that asked for every new message
            # (``state.count_refusals`` forgets those not repeated), and deletions wait for it too.
            log.info("mailbox %s: stopping; %d message(s) are retrieved at the next session", self._mailbox.id, len(numbers))
        else:
            asked_refused = [i for i in refused if i not in too_large]
            if not retrieved and len(asked_refused) > 1:
                raise TransientError(
                    f"All {len(asked_refused)} messages asked for were refused and none was served "
                    f"({refused[asked_refused[0]].rstrip('.')}): taken for a failure of the server rather than of "
                    "each message, so no refusal is counted and the next session asks again.",
                    reason="server_unavailable")
            await self._count_refusals(refused)
            if self._delete:
                await self._remove_processed(client, ids, repeated)
        async with self._pool.acquire() as conn:
            await state.forget_pop3_uidls(conn, self._mailbox.id, list(ids.values()), sorted(repeated))
        return published

    def _stopped(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()

    def _warn_untracked(self, untracked: list[str]) -> None:
        shown = ", ".join(untracked[:5]) + (" ..." if len(untracked) > 5 else "")
        text = (f"the POP3 server's UIDL gives {len(untracked)} message(s) no unique id Conduit can keep track of "
                f"(RFC 1939: 1-70 printable characters, no space; Conduit takes up to 200): {shown}; they are "
                "not ingested while it does")
        log.warning("mailbox %s: %s", self._mailbox.id, text)
        self.warnings.append(("uidl_unusable", text))

    def _log_repeats(self, repeated: set[str]) -> None:
        if self._mailbox.id in self._repeats_logged:
            return
        self._repeats_logged.add(self._mailbox.id)
        shown = ", ".join(sorted(repeated)[:5]) + (" ..." if len(repeated) > 5 else "")
        log.warning("mailbox %s: the POP3 server lists %d UIDL(s) for more than one message (%s): each message is "
                    "ingested, and none of them is ever deleted from the server", self._mailbox.id, len(repeated), shown)

    async def _flush(self, batch: list[Pulled]) -> int:
        if not batch:
            return 0
        ingested = await publish_pulled(self._pool, self._publisher, self._mailbox, "pop3", batch)
        async with self._pool.acquire() as conn, conn.transaction():
            await leases.hold(conn, self._mailbox.id, self._mailbox.lease_holder)
            await state.record_ingested(conn, self._mailbox.id, ingested)
            if len(ingested) < len(batch):
                # Further copies of a message (delivered twice) go with it once it is processed:
                # recorded whether or not the mailbox deletes now, as it may later.
                new = {i.uidl for i in ingested}
                await state.record_copies(conn, self._mailbox.id, await same_message(conn, self._mailbox.id, [
                    (state.IngestedMessage(ingest_key(self._mailbox, p.raw)[0], "", uidl=p.uidl), p.raw)
                    for p in batch if p.uidl not in new]))
            await state.mark_pop3_seen(conn, self._mailbox.id, [p.uidl for p in batch if p.uidl])
        return len(ingested)

    async def _count_refusals(self, refused: dict[str, str]) -> None:
        """Every message not yet seen was asked for: count the refusals; those skipped now count as
        seen, so they are not asked for again (nor deleted: they were never ingested)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await leases.hold(conn, self._mailbox.id, self._mailbox.lease_holder)
            counted = await state.count_refusals(conn, self._mailbox.id, "", 0, refused)
            await state.mark_pop3_seen(conn, self._mailbox.id, [r.server_id for r in counted if r.skipped])
        for code, text in state.refusal_warnings(counted, "the message with UIDL", ""):
            log.warning("mailbox %s: %s", self._mailbox.id, text)
            self.warnings.append((code, text))

    async def _remove_processed(self, client: Pop3Client, ids: dict[int, str], repeated: set[str]) -> None:
        """DELE what became an activity.  Only by a UIDL listed once: the message ingested under it
        (``state.deletable`` has only rows whose id was in every listing since they were ingested,
        ``state.forget_pop3_uidls``).  A repeated UIDL, or an id made up for one, is never a target."""
        async with self._pool.acquire() as conn:
            done = await state.deletable(conn, self._mailbox.id, lease_holder=self._mailbox.lease_holder)
        number_of = {i: n for n, i in ids.items() if i not in repeated and " " not in i}
        doomed = [item for item in done if item.uidl in number_of]
        numbers = sorted({number_of[item.uidl] for item in doomed})   # one DELE per message, never two
        await client.dele_many(numbers)
        self._awaiting_quit = doomed

    async def confirm_removed(self) -> None:
        """After QUIT succeeded: DELE takes effect only then, so only then is it recorded."""
        if self._awaiting_quit:
            async with self._pool.acquire() as conn:
                await state.mark_removed(conn, self._mailbox.id, self._awaiting_quit)
            self._awaiting_quit = []
