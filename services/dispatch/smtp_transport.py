"""The SMTP transport of the dispatch service: pools of reused, logged-in SMTP sessions.

``SmtpTransport`` keeps one ``SmtpPool`` per (server, username) and closes pools nobody used for a
while; an ``SmtpPool`` holds at most ``max_connections`` sessions to one server, serves its queue
of messages on them one transaction at a time per session, and replaces dead ones.  The protocol
itself lives in ``smtp_client``; the classes a caller needs are re-exported here.

Retry policy inside the transport is deliberately narrow: a message moves to another session (at
most twice) only when its own session turned out to be dead before any of its content was sent
(``StaleConnection``: typically a server that closed an idle session just as we wrote to it, or a
session that ended while the message's envelope rode along with the previous message's content).
Everything else goes back to the caller, whose send ledger owns retries; in particular
``SmtpOutcomeUnknown`` (the final dot left, no reply came back) is never retried here.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Sequence

from shared.errors import ConduitError, ConnectionFailed, InvalidInput

from .smtp_client import (
    OpenTransaction,
    PreparedMessage,
    SmtpAccepted,
    SmtpConnection,
    SmtpCredentials,
    SmtpOutcomeUnknown,
    SmtpPermanentFailure,
    SmtpServer,
    SmtpTemporaryFailure,
    StaleConnection,
    encode_content,
)

__all__ = [
    "SmtpAccepted",
    "SmtpCredentials",
    "SmtpOutcomeUnknown",
    "SmtpPermanentFailure",
    "SmtpPool",
    "SmtpServer",
    "SmtpTemporaryFailure",
    "SmtpTransport",
    "encode_content",
]

log = logging.getLogger(__name__)

# Servers drop idle sessions (Postfix smtpd after 300 s); past this age a fresh session is cheaper
# than a likely failed first write.
IDLE_SESSION_LIMIT = 60.0


class _Job:
    """One message waiting for, or going through, a session of the pool."""

    __slots__ = ("future", "message", "moved", "recipients", "sender")

    def __init__(self, sender: str, recipients: Sequence[str], message: bytes, future: asyncio.Future[SmtpAccepted]) -> None:
        self.sender = sender
        self.recipients = recipients
        self.message = message
        self.future = future
        self.moved = 0  # times it went back to the queue because its session died first

    def settle(self, outcome: SmtpAccepted | BaseException) -> None:
        if self.future.done():
            return  # the caller gave up waiting (cancelled)
        if isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)


# A message moves to another session when its own died before anything of it was delivered
# (``StaleConnection``); more moves than this means the server keeps dropping sessions.
_MAX_MOVES = 2


class SmtpPool:
    """Up to ``max_connections`` sessions to one server with one login, reused across messages.

    Messages wait in one queue; each session is served by a worker task that takes the next one.
    While a session sends one message's content, the next message in the queue rides along with
    its envelope in the same write (PIPELINING), so a busy session makes one write per message.
    """

    def __init__(
        self,
        server: SmtpServer,
        credentials: SmtpCredentials | None,
        *,
        max_connections: int = 10,
        helo_name: str | None = None,
        timeout: float = 30.0,
        data_timeout: float | None = None,
        max_messages_per_connection: int = 1000,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.server = server
        self.credentials = credentials
        self.max_connections = max_connections
        self.helo_name = helo_name or socket.gethostname()  # no DNS look-up, unlike getfqdn()
        self.timeout = timeout
        self.data_timeout = data_timeout  # None: ``timeout`` (see ``SmtpConnection``)
        self.max_messages_per_connection = max_messages_per_connection
        self._queue: collections.deque[_Job] = collections.deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._idle: list[tuple[SmtpConnection, float]] = []  # LIFO: keeps few sessions warm
        self._open: set[SmtpConnection] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._closed = False
        self.last_used = time.monotonic()
        self.coalesced = 0  # messages whose envelope left with the previous message's content

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def busy(self) -> bool:
        return self._in_flight > 0

    async def send(self, sender: str, recipients: Sequence[str], message: bytes) -> SmtpAccepted:
        """Send one message; see ``smtp_client`` for what each failure means.

        A caller that stops waiting (cancelled) does not stop a transaction already under way:
        the message may still go out, so such a send's outcome is unknown to the caller."""
        if self._closed:
            raise ConnectionFailed("the SMTP pool is closed", reason="pool_closed")
        job = _Job(sender, recipients, message, asyncio.get_running_loop().create_future())
        self._in_flight += 1
        self._queue.append(job)
        try:
            self._serve()
            return await job.future
        finally:
            self._in_flight -= 1
            self.last_used = time.monotonic()

    def resize(self, max_connections: int) -> None:
        """Take a new connection limit (the profile was edited): above the old one, sessions open as
        messages wait; below it, idle sessions close now and busy ones after their message."""
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        while self._idle and len(self._open) > max_connections:
            conn, _ = self._idle.pop(0)   # the longest idle first
            self._retire(conn)
        self._serve()

    async def check(self) -> None:
        """Connect, EHLO, TLS, AUTH and QUIT: the "Test & Enable" check of a profile.

        Uses the same client as sending, so a passing check means this code can send.  Called on a
        pool of its own, so its one session does not count against the sending sessions.
        """
        conn = self._session()
        await conn.open(self.credentials)
        await conn.quit()

    async def close(self) -> None:
        """QUIT idle sessions and fail what still waits; sessions in use close after their message."""
        self._closed = True
        while self._queue:
            self._queue.popleft().settle(ConnectionFailed("the SMTP pool is closed", reason="pool_closed"))
        while self._idle:
            conn, _ = self._idle.pop()
            self._retire(conn)
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- workers

    def _serve(self) -> None:
        """Give waiting messages sessions: idle ones first, then new ones, one per message in
        flight up to the limit (busy sessions also take waiting messages as they finish)."""
        now = time.monotonic()
        while self._queue and self._idle and len(self._workers) < self.max_connections:
            conn, since = self._idle.pop()
            if conn.usable and now - since < IDLE_SESSION_LIMIT:
                self._start_worker(conn)
            else:
                self._retire(conn)
        while self._queue and len(self._workers) < min(self.max_connections, self._in_flight):
            self._start_worker(None)

    def _start_worker(self, conn: SmtpConnection | None) -> None:
        task = asyncio.ensure_future(self._work(conn))
        self._workers.add(task)
        task.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        self._workers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("smtp session worker for %s failed: %r", self.server.host, task.exception())
        if self._queue and not self._closed:
            self._serve()

    def _next_job(self) -> _Job | None:
        while self._queue and not self._closed:
            job = self._queue.popleft()
            if not job.future.done():   # its caller did not give up
                return job
        return None

    async def _work(self, conn: SmtpConnection | None) -> None:
        """Serve the queue on one session until it is empty, the session ends or the pool closes."""
        # No semaphore here: ``_serve`` starts at most ``max_connections`` workers, and a limit
        # lowered meanwhile makes the extra ones stop between messages (``_over_limit``).
        reused = conn is not None
        if conn is None:
            try:
                conn = await self._connect()
            except Exception as exc:  # noqa: BLE001 - whatever it is, the message waiting learns of it
                if not isinstance(exc, ConduitError):
                    # A fault of ours or of a library: logged with its traceback, and the message
                    # fails as a connection failure (retried with back-off).  Left in the queue, it
                    # would start a new worker at once, failing the same way, in a tight loop.
                    log.error("opening an smtp session to %s failed unexpectedly", self.server.host, exc_info=exc)
                    exc = ConnectionFailed(f"could not open an SMTP session to {self.server.host}: {exc!r}")
                job = self._next_job()   # each message that finds no session fails with why
                if job is None:
                    log.info("smtp session to %s could not be opened: %s", self.server.host, exc)
                else:
                    job.settle(exc)
                return
        held: list[_Job] = []
        try:
            taken = await self._send_queued(conn, reused, held)
            if not taken and not reused and (job := self._next_job()) is not None:
                # A session that ended as soon as it was open (the server closed after AUTH): the
                # message learns of it, or the next worker would open one more at once, for ever.
                job.settle(ConnectionFailed(f"the SMTP session to {self.server.host} ended as soon as it was open"))
        except BaseException as exc:
            # Whatever this session held may have gone out: never resent blindly.
            for job in held:
                job.settle(SmtpOutcomeUnknown(f"the SMTP session stopped mid-transaction ({exc!r})"))
            conn.abort()
            raise
        finally:
            self._give_back(conn)

    async def _send_queued(self, conn: SmtpConnection, reused: bool, held: list[_Job]) -> int:
        """Send queued messages on ``conn``; ``held`` is what the session holds at any moment.
        Returns how many messages it took from the queue."""
        opened: OpenTransaction | None = None
        taken = 0
        while opened is not None or conn.usable:
            if opened is None:
                if self._over_limit():
                    return taken
                job = self._next_job()
                if job is None:
                    return taken
                taken += 1
                held[:] = [job]
                opened = await self._begin(conn, job, may_be_stale=reused)
                reused = False
                continue
            job = held[0]
            following = None
            if conn.pipelining and conn.messages_sent + 1 < self.max_messages_per_connection and not self._over_limit():
                following = self._next_job()
            prepared = self._prepare(conn, following) if following is not None else None
            if following is not None:
                taken += 1
            if prepared is not None:
                held.append(following)
                self.coalesced += 1
            outcome, after = await conn.finish(opened, prepared)
            job.settle(outcome)
            del held[0]
            opened = None
            if prepared is None:
                continue
            if isinstance(after, OpenTransaction):
                opened = after
            elif isinstance(after, StaleConnection):
                self._move(held.pop(), after)
            else:
                held.pop().settle(after)
        return taken

    def _over_limit(self) -> bool:
        """More sessions open than the limit allows (it was lowered): this one should end."""
        return len(self._open) > self.max_connections

    def _prepare(self, conn: SmtpConnection, job: _Job) -> PreparedMessage | None:
        try:
            return conn.prepare(job.sender, job.recipients, job.message)
        except (InvalidInput, SmtpPermanentFailure) as exc:
            job.settle(exc)   # refused before anything was written
            return None

    async def _begin(self, conn: SmtpConnection, job: _Job, *, may_be_stale: bool) -> OpenTransaction | None:
        """Send a message's envelope on its own; None when the message was settled or moved."""
        prepared = self._prepare(conn, job)
        if prepared is None:
            return None
        try:
            # Only a reused session can have died unnoticed; a fresh one's failures are real.
            return await conn.begin(prepared, may_be_stale=may_be_stale)
        except StaleConnection as exc:
            log.info("smtp session to %s was dead; the message moves to another one", self.server.host)
            self._move(job, exc)
        except ConduitError as exc:
            job.settle(exc)
        return None

    def _move(self, job: _Job, cause: StaleConnection) -> None:
        """Back to the head of the queue: nothing of it was delivered on the session that died."""
        job.moved += 1
        if job.moved > _MAX_MOVES:
            job.settle(ConnectionFailed(f"SMTP sessions to {self.server.host} keep closing: {cause}"))
        else:
            self._queue.appendleft(job)
            self._serve()

    # -- sessions

    async def _connect(self) -> SmtpConnection:
        conn = self._session()
        try:
            await conn.open(self.credentials)
        except ConduitError as exc:
            # The caller tells a server it cannot reach (a mailbox-level failure) from a
            # transaction that failed (a request-level one) by this mark.
            exc.opening_session = True  # type: ignore[attr-defined]
            raise
        self._open.add(conn)
        return conn

    def _session(self) -> SmtpConnection:
        return SmtpConnection(self.server, helo_name=self.helo_name, timeout=self.timeout,
                              data_timeout=self.data_timeout)

    def _give_back(self, conn: SmtpConnection) -> None:
        reusable = (
            conn.usable
            and not self._closed
            and conn.messages_sent < self.max_messages_per_connection
            and not self._over_limit()
        )
        if reusable:
            self._idle.append((conn, time.monotonic()))
        else:
            self._retire(conn)

    def _retire(self, conn: SmtpConnection) -> None:
        self._open.discard(conn)
        if not conn.usable:
            conn.abort()
            return
        task = asyncio.get_running_loop().create_task(conn.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


class SmtpTransport:
    """Every SMTP pool of a dispatch worker, keyed by (server, username)."""

    def __init__(
        self,
        *,
        helo_name: str | None = None,
        timeout: float = 30.0,
        data_timeout: float | None = None,
        max_messages_per_connection: int = 1000,
        idle_pool_timeout: float = 300.0,
    ) -> None:
        self.helo_name = helo_name
        self.timeout = timeout
        self.data_timeout = data_timeout
        self.max_messages_per_connection = max_messages_per_connection
        self.idle_pool_timeout = idle_pool_timeout
        self._pools: dict[tuple[SmtpServer, str | None], SmtpPool] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._swept_at = time.monotonic()

    def pool(
        self,
        server: SmtpServer,
        credentials: SmtpCredentials | None,
        max_connections: int = 10,
    ) -> SmtpPool:
        """The pool for this server and login, created on first use (no I/O here)."""
        self._close_idle_pools()
        key = (server, credentials.username if credentials else None)
        existing = self._pools.get(key)
        if existing is not None and existing.credentials == credentials:
            if existing.max_connections != max_connections:
                existing.resize(max_connections)   # the profile's limit was edited
            return existing
        if existing is not None:
            self._close_pool(existing)  # the secret or mechanism changed (rotated token)
        pool = SmtpPool(
            server,
            credentials,
            max_connections=max_connections,
            helo_name=self.helo_name,
            timeout=self.timeout,
            data_timeout=self.data_timeout,
            max_messages_per_connection=self.max_messages_per_connection,
        )
        self._pools[key] = pool
        return pool

    def sweep_idle(self) -> None:
        """Close pools unused for ``idle_pool_timeout`` (their sessions end in the background): for
        the service's periodic task, since a replica that sends nothing more never calls ``pool``."""
        self._close_idle_pools()

    async def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(p.close() for p in pools), *self._closing, return_exceptions=True)

    def _close_idle_pools(self) -> None:
        at = time.monotonic()
        if at - self._swept_at < 1.0:
            return  # called per message: looking once a second is plenty for a minutes-long timeout
        self._swept_at = at
        deadline = at - self.idle_pool_timeout
        for key, pool in list(self._pools.items()):
            if not pool.busy and pool.last_used < deadline:
                del self._pools[key]
                self._close_pool(pool)

    def _close_pool(self, pool: SmtpPool) -> None:
        task = asyncio.get_running_loop().create_task(pool.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
