"""Clearing claimed requests to reach their transport, so that a crash fails only what may have left.

A claimed row (`sending`) can wait a while before a transport takes it: behind its pool's sessions,
or for its turn's commit.  Were the worker to die then, nobody could tell whether it was sent, and it
would fail as `outcome_unknown` although it never left.  So a send first waits for one of its
mailbox's few places (``PLACES_PER_CONNECTION`` per connection of its profile), then this worker
commits ``started_at`` for it, together with every other send that became ready meanwhile (one round
trip for many, as a group commit), and only then hands it over.  A dead worker's rows without
``started_at`` go back to `pending_send` (``ledger.requeue_unstarted``).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from uuid import UUID

import asyncpg

from shared.errors import TransientError

from . import ledger

# Sends cleared to start per connection of the mailbox's profile: what a crash can leave ambiguous.
# Each session needs its next message ready (the SMTP pool writes the next envelope with the current
# content), and the one after that should be cleared while those two go out: with 2 per connection
# the sessions waited for clearances (bench/dispatch_send.py: 905-1,053 msg/s against 1,101-1,166
# with 4; 8 gave no more: 957-1,126).
PLACES_PER_CONNECTION = 4


class StartGate:
    def __init__(self, pool: asyncpg.Pool, worker_id: int) -> None:
        self._pool = pool
        self._worker_id = worker_id
        self._places: dict[UUID, tuple[int, asyncio.Semaphore]] = {}
        self._waiting: dict[UUID, asyncio.Future[bool]] = {}
        self._flushing: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None   # kept between commits: a pool release resets it

    async def enter(self, mailbox_id: UUID, places: int) -> asyncio.Semaphore:
        """Take one of the mailbox's ``places``; the caller gives it back (``release``), whatever happens.

        A changed number (the profile's connection limit was edited) starts a new count: the sends
        holding a place of the old one give it back there, so for the length of one send the two
        counts can overlap.  The SMTP pool still never opens more sessions than the new limit."""
        place = self._places.get(mailbox_id)
        if place is None or place[0] != places:
            place = self._places[mailbox_id] = (places, asyncio.Semaphore(places))
        await place[1].acquire()
        return place[1]

    async def clear(self, row_id: UUID) -> bool:
        """Commit the row's start; whether it is still this worker's (False: another worker took it
        back, so it must not be sent).  A failure to commit raises ``TransientError``: nothing was sent."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting[row_id] = waiter
        if self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush())
        return await waiter

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, {}
                try:
                    ours = await self._mark(list(batch))
                except Exception as exc:  # noqa: BLE001 - every waiter learns it may not start
                    _fail(batch.values(), TransientError(f"the start of the send could not be recorded ({exc})",
                                                         reason="ledger_unavailable"))
                    continue
                except BaseException:
                    _fail(batch.values(), TransientError("the dispatch service is stopping", reason="stopping"))
                    raise
                for row_id, waiter in batch.items():
                    if not waiter.done():
                        waiter.set_result(row_id in ours)
        finally:
            self._flushing = None

    async def _mark(self, ids: list[UUID]) -> set[UUID]:
        if self._conn is None:
            self._conn = await self._pool.acquire()
        try:
            return await ledger.mark_started(self._conn, ids, self._worker_id)
        except BaseException:
            conn, self._conn = self._conn, None
            await self._pool.release(conn)   # the pool resets or replaces it
            raise

    async def close(self) -> None:
        if self._flushing is not None:
            self._flushing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flushing
        _fail(self._waiting.values(), TransientError("the dispatch service is stopping", reason="stopping"))
        self._waiting.clear()
        if self._conn is not None:
            await self._pool.release(self._conn)
            self._conn = None


def _fail(waiters: Iterable[asyncio.Future[bool]], error: TransientError) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(error)
