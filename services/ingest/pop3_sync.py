"""Synchronise one POP3 mailbox: UIDL bookkeeping says what is new; queues that delete after
processing remove (DELE, committed by QUIT) what became a durable activity.

A message the server refuses to hand over (-ERR to RETR) does not stop the messages after it: they
are retrieved, and the refused one is asked for again at the next syncs (its UIDL is not recorded as
seen) and skipped, with a warning naming its UIDL, once refused ``state.REFUSALS_BEFORE_SKIP`` times."""
from __future__ import annotations

import logging

import asyncpg

from services.ingest import leases, state
from services.ingest.pop3_client import Pop3Client, RetrRefused
from services.ingest.publishing import BATCH_BYTES, Mailbox, Pulled, ingest_key, publish_pulled, same_message
from shared.kafka import Publisher

log = logging.getLogger(__name__)

BATCH = 200


class Pop3Sync:
    def __init__(self, pool: asyncpg.Pool, publisher: Publisher, mailbox: Mailbox, *, delete_after_processing: bool = False) -> None:
        self._pool = pool
        self._publisher = publisher
        self._mailbox = mailbox
        self._delete = delete_after_processing
        self._awaiting_quit: list[state.IngestedMessage] = []
        # (code, text) of warnings for the mailbox's alerts; the runner raises and clears them.
        self.warnings: list[tuple[str, str]] = []

    async def sync(self, client: Pop3Client) -> int:
        listing = await client.uidl()
        async with self._pool.acquire() as conn:
            seen = await state.pop3_seen(conn, self._mailbox.id)
        new = [(n, u) for n, u in sorted(listing.items()) if u not in seen]
        published = 0
        uidl_of = dict(new)
        batch: list[Pulled] = []
        batch_bytes = 0
        numbers = [n for n, _ in new]
        refused: dict[str, str] = {}   # UIDL -> the server's refusal
        while numbers:
            try:
                async for number, raw in client.retr_many(numbers):
                    batch.append(Pulled(raw, None, None, uidl_of[number]))
                    batch_bytes += len(raw)
                    if len(batch) >= BATCH or batch_bytes >= BATCH_BYTES:
                        published += await self._flush(batch)
                        batch, batch_bytes = [], 0
                numbers = []
            except RetrRefused as exc:
                if exc.temporary:
                    raise
                refused[uidl_of[exc.number]] = exc.message
                numbers = numbers[numbers.index(exc.number) + 1:]
        published += await self._flush(batch)
        await self._count_refusals(refused)
        if self._delete:
            await self._remove_processed(client, listing)
        async with self._pool.acquire() as conn:
            await state.forget_pop3_uidls(conn, self._mailbox.id, list(listing.values()))
        return published

    async def _flush(self, batch: list[Pulled]) -> int:
        if not batch:
            return 0
        ingested = await publish_pulled(self._pool, self._publisher, self._mailbox, "pop3", batch)
        async with self._pool.acquire() as conn, conn.transaction():
            await leases.hold(conn, self._mailbox.id, self._mailbox.lease_holder)
            await state.record_ingested(conn, self._mailbox.id, ingested)
            if self._delete and len(ingested) < len(batch):
                # Further copies of a message (delivered twice) go with it once it is processed.
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

    async def _remove_processed(self, client: Pop3Client, listing: dict[int, str]) -> None:
        async with self._pool.acquire() as conn:
            done = await state.deletable(conn, self._mailbox.id, lease_holder=self._mailbox.lease_holder)
        number_of = {u: n for n, u in listing.items()}
        doomed = [item for item in done if item.uidl in number_of]
        for item in doomed:
            await client.dele(number_of[item.uidl])
        self._awaiting_quit = doomed

    async def confirm_removed(self) -> None:
        """After QUIT succeeded: DELE takes effect only then, so only then is it recorded."""
        if self._awaiting_quit:
            async with self._pool.acquire() as conn:
                await state.mark_removed(conn, self._mailbox.id, self._awaiting_quit)
            self._awaiting_quit = []
