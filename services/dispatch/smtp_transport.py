"""The SMTP transport of the dispatch service: pools of reused, logged-in SMTP sessions.

``SmtpTransport`` keeps one ``SmtpPool`` per (server, username) and closes pools nobody used for a
while; an ``SmtpPool`` holds at most ``max_connections`` sessions to one server, hands each to one
sender at a time and replaces dead ones.  The protocol itself lives in ``smtp_client``; the
classes a caller needs are re-exported here.

Retry policy inside the transport is deliberately narrow: a send is retried once, on a fresh
connection, only when the connection turned out to be dead before the server answered any part
of the transaction and no message content was sent (``StaleConnection``: typically a server that
closed an idle session just as we wrote to it).  Everything else goes back to the caller, whose
send ledger owns retries; in particular ``SmtpOutcomeUnknown`` (the final dot left, no reply
came back) is never retried here.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Sequence

from shared.errors import ConduitError, ConnectionFailed

from .smtp_client import (
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


class SmtpPool:
    """Up to ``max_connections`` sessions to one server with one login, reused across messages."""

    def __init__(
        self,
        server: SmtpServer,
        credentials: SmtpCredentials | None,
        *,
        max_connections: int = 10,
        helo_name: str | None = None,
        timeout: float = 30.0,
        max_messages_per_connection: int = 1000,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.server = server
        self.credentials = credentials
        self.max_connections = max_connections
        self.helo_name = helo_name or socket.gethostname()  # no DNS look-up, unlike getfqdn()
        self.timeout = timeout
        self.max_messages_per_connection = max_messages_per_connection
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[tuple[SmtpConnection, float]] = []  # LIFO: keeps few sessions warm
        self._open: set[SmtpConnection] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._closed = False
        self.last_used = time.monotonic()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def busy(self) -> bool:
        return self._in_flight > 0

    async def send(self, sender: str, recipients: Sequence[str], message: bytes) -> SmtpAccepted:
        """Send one message; see ``smtp_client`` for what each failure means."""
        if self._closed:
            raise ConnectionFailed("the SMTP pool is closed", reason="pool_closed")
        self._in_flight += 1
        try:
            async with self._slots:
                conn, reused = await self._take()
                try:
                    return await self._send_once(conn, sender, recipients, message, reused)
                except StaleConnection:
                    log.info("smtp session to %s was dead; retrying on a new one", self.server.host)
                conn = await self._connect()
                return await self._send_once(conn, sender, recipients, message, False)
        finally:
            self._in_flight -= 1
            self.last_used = time.monotonic()

    async def _send_once(
        self,
        conn: SmtpConnection,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        reused: bool,
    ) -> SmtpAccepted:
        try:
            # Only a reused session can have died unnoticed; a fresh one's failures are real.
            return await conn.send(sender, recipients, message, may_be_stale=reused)
        finally:
            self._give_back(conn)

    async def check(self) -> None:
        """Connect, EHLO, TLS, AUTH and QUIT: the "Test & Enable" check of a profile.

        Uses the same client as sending, so a passing check means this code can send.
        """
        async with self._slots:
            conn = SmtpConnection(self.server, helo_name=self.helo_name, timeout=self.timeout)
            await conn.open(self.credentials)
            await conn.quit()

    async def close(self) -> None:
        """QUIT idle sessions; sessions in use close when their send returns."""
        self._closed = True
        while self._idle:
            conn, _ = self._idle.pop()
            self._retire(conn)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- sessions

    async def _take(self) -> tuple[SmtpConnection, bool]:
        """A session for one send, and whether it is a reused (idle) one."""
        now = time.monotonic()
        while self._idle:
            conn, since = self._idle.pop()
            if conn.usable and now - since < IDLE_SESSION_LIMIT:
                return conn, True
            self._retire(conn)
        return await self._connect(), False

    async def _connect(self) -> SmtpConnection:
        conn = SmtpConnection(self.server, helo_name=self.helo_name, timeout=self.timeout)
        try:
            await conn.open(self.credentials)
        except ConduitError as exc:
            # The caller tells a server it cannot reach (a mailbox-level failure) from a
            # transaction that failed (a request-level one) by this mark.
            exc.opening_session = True  # type: ignore[attr-defined]
            raise
        self._open.add(conn)
        return conn

    def _give_back(self, conn: SmtpConnection) -> None:
        reusable = (
            conn.usable
            and not self._closed
            and conn.messages_sent < self.max_messages_per_connection
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
        max_messages_per_connection: int = 1000,
        idle_pool_timeout: float = 300.0,
    ) -> None:
        self.helo_name = helo_name
        self.timeout = timeout
        self.max_messages_per_connection = max_messages_per_connection
        self.idle_pool_timeout = idle_pool_timeout
        self._pools: dict[tuple[SmtpServer, str | None], SmtpPool] = {}
        self._closing: set[asyncio.Task[None]] = set()

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
            return existing
        if existing is not None:
            self._close_pool(existing)  # the secret or mechanism changed (rotated token)
        pool = SmtpPool(
            server,
            credentials,
            max_connections=max_connections,
            helo_name=self.helo_name,
            timeout=self.timeout,
            max_messages_per_connection=self.max_messages_per_connection,
        )
        self._pools[key] = pool
        return pool

    async def close_idle(self) -> None:
        """Close pools unused for ``idle_pool_timeout``; for a periodic task of the service."""
        self._close_idle_pools()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(p.close() for p in pools), *self._closing, return_exceptions=True)

    def _close_idle_pools(self) -> None:
        deadline = time.monotonic() - self.idle_pool_timeout
        for key, pool in list(self._pools.items()):
            if not pool.busy and pool.last_used < deadline:
                del self._pools[key]
                self._close_pool(pool)

    def _close_pool(self, pool: SmtpPool) -> None:
        task = asyncio.get_running_loop().create_task(pool.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
