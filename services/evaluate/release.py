"""Releasing held messages: each evaluated again, through the normal rule chain, once its mailbox
may process email again.

At start and every ``CONDUIT_EVALUATE_RELEASE_SECONDS``, evaluate looks for mailboxes with held
messages that the guards which held them now let through (``chains.may_process``), and evaluates
their messages again in the order they were held, in batches of ``CONDUIT_EVALUATE_RELEASE_BATCH``:
each batch is one transaction, like a consumer batch, that records the final decisions and lets the
held events go.  No other service takes part.  One replica releases at a time; a message whose
mailbox is paused again meanwhile is simply held again, and a mailbox that never may process email
again keeps its messages held (and visible to ``conduit message why``).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from uuid import UUID

import asyncpg

from services.evaluate import held
from services.evaluate import repository as repo
from services.evaluate.chains import may_process
from shared.batching import by_size
from shared.consumer import Delivery
from shared.events.topics import EMAIL_RECEIVED
from shared.metrics import HELD_RELEASED

log = logging.getLogger(__name__)

# Evaluates deliveries again; the keys are the (mailbox, Message-ID) pairs released, which do not wait
# behind their own mailbox's held messages.  Returns how many held messages were decided for good.
EvaluateAgain = Callable[[Sequence[Delivery], frozenset[tuple[UUID, str]]], Awaitable[int]]


class HeldMessageRelease:
    """The periodic look for held messages whose mailbox may process email again."""

    def __init__(self, pool: asyncpg.Pool, evaluate_again: EvaluateAgain, *, batch: int, interval: float,
                 max_bytes: int = 32 * 1024 * 1024) -> None:
        self._pool = pool
        self._evaluate_again = evaluate_again
        self.batch = batch
        self.max_bytes = max_bytes   # of raw mail per batch, as the consumer's batches (max_batch_bytes)
        self.interval = interval
        self.released = 0  # held messages decided for good by this process

    async def run(self, stopping: asyncio.Event) -> None:
        """Release at once, then every ``interval``, until ``stopping`` is set."""
        while not stopping.is_set():
            try:
                await self.release(stopping)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError) as exc:
                # The database's trouble, not ours: what was not released stays held for the next look.
                log.warning("releasing held messages failed, trying again in %.0f s: %s", self.interval, exc)
            except Exception:  # noqa: BLE001 - a fault of ours is reported, and the consumer goes on
                log.exception("releasing held messages failed")
            try:
                await asyncio.wait_for(stopping.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    async def release(self, stopping: asyncio.Event | None = None) -> int:
        """Evaluate again, batch by batch, the held messages of every mailbox that may process email
        now; return how many were decided for good (0 while another replica releases).  Stops between
        batches once ``stopping`` is set: a long backlog must not outlast a shutdown's grace period."""
        total, mailboxes = 0, set()
        async with held.releasing_alone(self._pool) as alone:
            if not alone:
                return 0
            while stopping is None or not stopping.is_set():
                rows = await self._next_batch()
                if not rows:
                    break
                deliveries, event_ids = _deliveries(rows)
                # Large mail: the first part alone, the rest in the next turns (in order either way).
                part = by_size(deliveries, lambda d: d.event.data.size, self.max_bytes)[0]
                whole = len(part) == len(deliveries)
                if not whole:
                    kept = {d.event.event_id for d in part}
                    rows = [row for row, event_id in zip(rows, event_ids) if event_id in kept]
                keys = frozenset((r["mailbox_id"], r["message_id"]) for r in rows)
                decided = await self._evaluate_again(part, keys)
                decided += await self._let_go_evaluated(rows)
                total += decided
                mailboxes.update(m for m, _ in keys)
                if decided == 0 or whole and len(rows) < self.batch:
                    break  # all done, or every one held again (paused meanwhile): the next look retries
        if total:
            self.released += total
            HELD_RELEASED.inc(total)
            log.info("released %d held message(s) of %d mailbox(es)", total, len(mailboxes))
        return total

    async def _let_go_evaluated(self, rows: Sequence[asyncpg.Record]) -> int:
        """The held events just evaluated again and decided for good that the batch's transaction
        kept (``held.let_go_evaluated``); how many."""
        evaluated = [(r["mailbox_id"], r["message_id"], UUID(r["event"]["event_id"])) for r in rows]
        async with self._pool.acquire() as conn:
            return await held.let_go_evaluated(conn, evaluated)

    async def _next_batch(self) -> list[asyncpg.Record]:
        async with self._pool.acquire() as conn:
            waiting = await held.mailboxes_holding(conn)
            if not waiting:
                return []
            rows = await repo.mailbox_rows(conn, [m for m, _ in waiting])
            ready = [(m, forwarded) for m, forwarded in waiting
                     if m in rows and may_process(repo.mailbox_context(rows[m], forwarded=forwarded))]
            return await held.oldest(conn, ready, self.batch) if ready else []


def _deliveries(rows: Sequence[asyncpg.Record]) -> tuple[list[Delivery], list[UUID]]:
    """The held events as deliveries, in order, each once (a forward's attached messages share one),
    and the event id of each row."""
    deliveries: dict[UUID, Delivery] = {}
    event_ids = []
    for row in rows:
        event = EMAIL_RECEIVED.envelope.model_validate(row["event"])
        # Not from the topic: there is no record to commit or dead-letter.
        deliveries.setdefault(event.event_id, Delivery(event, None))  # type: ignore[arg-type]
        event_ids.append(event.event_id)
    return list(deliveries.values()), event_ids
