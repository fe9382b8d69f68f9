"""One mailbox's life in an ingest replica: connect with its profile's settings, sync, then wait
for news (IMAP IDLE, when a connection slot can be spared) or for the next poll.

Failures become mailbox state, not crashes: a wrong password, a refused connection, a TLS error or
a timeout records an alert, counts the error and backs the mailbox off (exponentially); the runner
ends and the scheduler starts a new one once the back-off is over.  The first success afterwards
records the recovery.  One mailbox's trouble never holds up another's.

A server that ends a working session (signed in, synced, idling: its BYE on a restart or shutdown,
or the connection closed or reset) is no failure of the mailbox: the runner signs in again after a
short jittered delay, with no alert.  While the server stays away the runner keeps trying, backing
off (capped), for a grace period (``IngestSettings.reconnect_grace_seconds``); only a reconnection
that fails past it, or for another reason than the connection (a refused password, TLS), is
recorded as a failure.
"""
from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

import asyncpg
from aiokafka.errors import KafkaError

from services.ingest import leases, state
from services.ingest.imap_client import ImapClient
from services.ingest.imap_sync import UNDELIVERABLE_FOLDER, ImapFolderSync
from services.ingest.pop3_client import Pop3Client
from services.ingest.pop3_sync import Pop3Sync
from services.ingest.publishing import Mailbox
from shared.errors import (AuthenticationFailed, ConduitError, ConnectionFailed, InvalidInput, ProtocolTimeout,
                           raised_by_database)
from shared.kafka import Publisher
from shared.metrics import FOLLOW_UP_POLLS, INFRASTRUCTURE_FAILURES, MAILBOX_FAILURES
from shared.oauth import TokenProvider
from shared.registry.service import MailboxWork, Registry, decode_bytea
from shared.tls import client_context

log = logging.getLogger(__name__)

# Signing in again after the server ended a working session: the first attempt after 0.5-2 s (a
# restarted server is not met by every mailbox in the same millisecond), each later one after up to
# twice as long, at most 10 s.
RECONNECT_FIRST_DELAY_SECONDS = 2.0
RECONNECT_DELAY_CAP_SECONDS = 10.0
# A session ended sooner than this after it began working is cut short: it does not start the delays
# afresh (a server that ends every session at once is met every ~10 s, not every second), and this
# many cut short in a row are a failure of the mailbox (alert, back-off), not a restart.
STEADY_SESSION_SECONDS = 60.0
CUT_SHORT_BEFORE_FAILURE = 5


class ServerEndedSession(ConnectionFailed):
    """The server ended a session that worked (signed in, synced, idling or polling in IDLE's loop):
    its BYE, or the connection closed or reset.  Not a failure of the mailbox by itself."""


class ConnectionSlots:
    """At most ``limit`` sessions open to one server at once; the limit may change while they are open.

    A lowered limit opens no new session until enough of the open ones have ended; a raised one lets
    waiting sessions in at once.  (An ``asyncio.Semaphore`` per limit would count the sessions of the
    old limit and of the new one apart, and let both sets open at once.)"""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    async def __aenter__(self) -> None:
        while self.in_use >= self.limit:
            turn = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._wake()   # woken, then cancelled: the free slot goes to the next in line
                else:
                    self._waiting.remove(turn)
                raise
        self.in_use += 1

    async def __aexit__(self, *exc: object) -> None:
        self.in_use -= 1
        self._wake()

    def _wake(self) -> None:
        free = self.limit - self.in_use
        while free > 0 and self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                free -= 1


def _edited(profile: dict) -> str:
    """When the profile was last edited, as text that sorts in time ("" when unknown)."""
    try:
        return datetime.fromisoformat(profile["updated_at"]).astimezone(timezone.utc).isoformat(timespec="microseconds")
    except (KeyError, TypeError, ValueError):
        return ""


class ServerSlots:
    """At most the profile's max concurrent connections per server, per replica.

    Counted per profile and server: two profiles that name one server each keep their own limit
    (one count shared by both would be reset by each in turn, and enforce neither).  An edited limit
    resizes the count: the sessions of runners started before the edit still count against it."""

    def __init__(self) -> None:
        self._slots: dict[tuple[object, str, int], tuple[str, ConnectionSlots]] = {}

    def for_server(self, profile_id: object, host: str, port: int, limit: int, edited: str = "") -> ConnectionSlots:
        """The server's slots.  ``edited``: the profile's updated_at, so that a runner still on the
        profile before an edit does not set its old limit back."""
        key = (profile_id, host, port)
        found = self._slots.get(key)
        if found is None:
            found = self._slots[key] = (edited, ConnectionSlots(limit))
        elif edited > found[0]:
            found[1].resize(limit)
            found = self._slots[key] = (edited, found[1])
        return found[1]


@dataclass(frozen=True)
class FollowUp:
    """How an idling session watches for more mail once some came (``IngestSettings.follow_up_*``)."""

    seconds: float = 0.0        # 0: idle again at once
    poll_seconds: float = 0.1


async def _stopped_within(stopping: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` unless stopped first; whether stopped."""
    try:
        await asyncio.wait_for(stopping.wait(), timeout=max(seconds, 0))
        return True
    except TimeoutError:
        return False


class OutageLog:
    """Says Conduit's own outage (its database or broker away) in one WARNING per kind of failure per
    ``every`` seconds for the whole replica: each runner meets it at each of its sessions, and at
    1,000 mailboxes a line per mailbox per interval would bury everything else in the log.  The rest
    go to DEBUG, and the next such line counts them."""

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self._said_at: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def warn(self, kind: str, message: str, *args: object) -> None:
        now = asyncio.get_running_loop().time()
        said_at = self._said_at.get(kind)
        if said_at is not None and now - said_at < self.every:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            log.debug(message, *args)
            return
        if quiet := self._quiet.pop(kind, 0):
            message += "; %d more such failures of this replica's mailboxes since the last such line"
            args = (*args, quiet)
        self._said_at[kind] = now
        log.warning(message, *args)


@dataclass
class RunnerContext:
    pool: object
    publisher: Publisher
    registry: Registry
    slots: ServerSlots
    tokens: TokenProvider
    follow_up: FollowUp = FollowUp()
    # What a session waits for a server's answer (``IngestSettings.command_timeout_seconds``).
    command_timeout: float = 30.0
    # An idling session leaves IDLE this often to look at the Inbox (``IngestSettings.idle_check_seconds``).
    idle_check: float = 300.0
    # How long a runner tries to sign in again, quietly, after the server ended a working session
    # (``IngestSettings.reconnect_grace_seconds``).
    reconnect_grace: float = 60.0
    # This replica's name on its leases; what a session records is fenced by it (``leases.hold``).
    # None: no leases in play (a test or a benchmark driving a runner directly).
    lease_holder: str | None = None
    # Mailbox -> the tracked folders its alerts said are missing: said once, not at every session
    # (a reconnect or a profile edit starts new sessions, and other alerts come in between).
    missing_reported: dict[object, frozenset[str]] = field(default_factory=dict)
    outage_log: OutageLog = field(default_factory=OutageLog)


class MailboxRunner:
    def __init__(self, ctx: RunnerContext, work: MailboxWork, *, idle_allowed: bool) -> None:
        self._ctx = ctx
        self._work = work
        self._profile = work.profile
        self._idle_allowed = idle_allowed
        self._mailbox = Mailbox(work.id, work.organization_id, work["owner_kind"] is None, ctx.lease_holder)
        self.last_sync: datetime | None = None
        self.failed = False
        self._client: ImapClient | None = None  # the open IMAP session, if any
        # After the server ended a working session: when the grace for signing in again ends (loop
        # time), and the attempts made so far.  None: no reconnection going on.
        self._grace_ends: float | None = None
        self._reconnects = 0
        self._working_since = -math.inf   # loop time the current session began working
        self._cut_short = 0               # sessions in a row the server ended soon after they began working

    @property
    def idling(self) -> bool:
        """True while the session waits in IMAP IDLE for the server to announce new mail."""
        return self._client is not None and self._client.idling

    @property
    def reconnecting(self) -> bool:
        """True between the server ending a working session and the next session that works, while
        the grace for signing in again lasts."""
        return self._grace_ends is not None

    @property
    def idle_allowed(self) -> bool:
        """Whether this runner may hold its connection in IDLE (``IngestService._idle_allowance``)."""
        return self._idle_allowed

    @property
    def protocol(self) -> str:
        return self._profile["server_type"]

    @property
    def interval(self) -> float:
        return float(self._profile["min_polling_interval_seconds"])

    def _slot(self) -> ConnectionSlots:
        return self._ctx.slots.for_server(self._profile["id"], self._profile["incoming_host"],
                                          self._profile["incoming_port"], self._profile["max_concurrent_connections"],
                                          _edited(self._profile))

    async def run(self, stopping: asyncio.Event) -> None:
        """Sync until stopped or until a failure puts the mailbox into back-off."""
        while not stopping.is_set():
            if not await self.sync_once(stopping, keep_open=self._idle_allowed):
                return
            await _stopped_within(stopping, self._pause())

    def _pause(self) -> float:
        """How long to wait before the next session: the polling interval, or while reconnecting the
        next jittered, doubling delay, never past the end of the grace."""
        if self._grace_ends is None:
            return self.interval
        ceiling = min(RECONNECT_DELAY_CAP_SECONDS, RECONNECT_FIRST_DELAY_SECONDS * 2 ** min(self._reconnects, 8))
        self._reconnects += 1
        remaining = self._grace_ends - asyncio.get_running_loop().time()
        # Never at once, even past the grace: the next attempt is then the one recorded as a failure.
        floor = RECONNECT_FIRST_DELAY_SECONDS / 4
        return max(floor, min(remaining, ceiling * random.uniform(0.25, 1.0)))

    async def sync_once(self, stopping: asyncio.Event | None = None, *, keep_open: bool = False) -> bool:
        """One session; with ``keep_open`` (IMAP IDLE) it lasts until stopped.  False on failure."""
        try:
            if self.protocol == "imap":
                await self._imap_session(stopping, keep_open)
            elif self.protocol == "pop3":
                await self._pop3_session(stopping)
            else:
                raise InvalidInput(f"incoming email over {self.protocol} is handled by exchange_sync, not ingest",
                                   reason="unsupported_profile")
            # Within the try: recording a recovery needs the database, whose failure is not the mailbox's.
            await self._working()
        except leases.LeaseLost as exc:
            # Another replica works the mailbox now (this one could not renew in time): nothing more
            # is recorded here, and it is no failure of the mailbox.
            log.warning("%s; its session here stops", exc.message)
            return False
        except ServerEndedSession as exc:
            now = asyncio.get_running_loop().time()
            if now - self._working_since >= STEADY_SESSION_SECONDS:
                self._reconnects = self._cut_short = 0
            else:
                self._cut_short += 1
                if self._cut_short >= CUT_SHORT_BEFORE_FAILURE:
                    await self._failed(exc.reason, f"{exc.message} The server ended {self._cut_short} sessions "
                                                   f"in a row within {STEADY_SESSION_SECONDS:.0f} s of signing in.")
                    return False
            self._grace_ends = now + self._ctx.reconnect_grace
            log.info("mailbox %s: %s Signing in again (a failure only if that fails for %.0f s).",
                     self._work.id, exc.message, self._ctx.reconnect_grace)
            return True
        except ConduitError as exc:
            if self._still_in_grace(exc):
                return True
            await self._failed(exc.reason, exc.message)
            return False
        except asyncpg.DataError as exc:
            # PostgreSQL refused a value the server sent (SQLSTATE class 22: a UID past 64 bits, say):
            # the same session would fail the same way, so this is the mailbox's failure, with an
            # alert and back-off, not the database's (retried at every interval without a word).
            await self._failed("unstorable", f"the server sent a value Conduit cannot store: {exc}")
            return False
        except (asyncpg.PostgresError, asyncpg.InterfaceError, KafkaError) as exc:
            self._infrastructure_failed(exc)
            return True
        except OSError as exc:
            if raised_by_database(exc):
                # asyncpg lets a failure to connect out as it is (ConnectionRefusedError,
                # FileNotFoundError for a Unix socket, TimeoutError): the database is away.
                self._infrastructure_failed(exc)
                return True
            await self._failed("connection_failed", f"connection error: {exc.strerror or exc}")
            return False
        except Exception as exc:  # noqa: BLE001 - a fault of ours or of a library, met with this mailbox
            # The mailbox backs off with an alert naming the failure, as for any other; the runner
            # dying instead would be started again within seconds, signing in each time.
            log.error("mailbox %s: unexpected failure while syncing", self._work.id, exc_info=exc)
            await self._failed("internal_error", f"unexpected {type(exc).__name__} while syncing (details in the ingest log)")
            return False
        return True

    def _infrastructure_failed(self, exc: BaseException) -> None:
        """Conduit's own database or broker failed, not the mailbox: no alert, no back-off of the
        mailbox.  The session ends (nothing past the last saved batch counts as done) and the runner
        tries again after its polling interval, not at once: a mail server is not asked for the same
        messages in a loop while the broker is away."""
        INFRASTRUCTURE_FAILURES.labels("ingest", type(exc).__name__).inc()
        # A reconnection under way ends with it: the next session waits the interval too.
        self._grace_ends = None
        what = "the database cannot be reached" if isinstance(exc, OSError) else "ingest could not store or publish"
        self._ctx.outage_log.warn(what, "mailbox %s: %s (%s: %s); trying again in %.0f s",
                                  self._work.id, what, type(exc).__name__, exc, self.interval)

    def _still_in_grace(self, exc: ConduitError) -> bool:
        """Whether a session that failed to connect is tried again without a failure recorded: the
        server ended a working session shortly before (a restart takes a while), and the failure is
        the connection's; a refused password or certificate is recorded at once."""
        if self._grace_ends is None or not isinstance(exc, (ConnectionFailed, ProtocolTimeout)):
            return False
        if asyncio.get_running_loop().time() >= self._grace_ends:
            return False
        log.debug("mailbox %s: signing in again failed (%s); trying again", self._work.id, exc.message)
        return True

    async def _working(self) -> None:
        """The session signed in and synced: a reconnection is over, a failing mailbox has recovered."""
        self._grace_ends = None
        self._working_since = asyncio.get_running_loop().time()
        if self.failed or self._work["incoming_error_count"]:
            await self._ctx.registry.record_success(self._work.id, "incoming")
            self.failed = False

    async def _failed(self, reason: str, message: str) -> None:
        self.failed = True
        self._grace_ends = None
        MAILBOX_FAILURES.labels("incoming", reason).inc()
        log.warning("mailbox %s incoming failed: %s", self._work.id, message)
        await self._ctx.registry.record_failure(self._work.id, "incoming", reason, message)

    async def _imap_session(self, stopping: asyncio.Event | None, keep_open: bool) -> None:
        profile = self._profile
        sync = ImapFolderSync(self._ctx.pool, self._ctx.publisher, self._mailbox,  # type: ignore[arg-type]
                              received_after=profile.get("process_email_received_after") and
                              datetime.fromisoformat(profile["process_email_received_after"]),
                              delete_after_processing=bool(self._work["delete_after_processing"]),
                              undeliverable=UNDELIVERABLE_FOLDER if profile.get("move_failed_to_undeliverable") else None,
                              stopping=stopping)
        folders = list(self._work["tracked_folders"]) or ["INBOX"]
        # INBOX last, so that the folder IDLE watches is the one selected when we start idling.
        folders.sort(key=lambda f: f.upper() == "INBOX")
        await self._bind_server()
        async with self._slot():
            client = await ImapClient.connect(profile["incoming_host"], profile["incoming_port"],
                                              tls=profile["incoming_tls"], ssl_context=client_context(profile.get("tls_ca_file")),
                                              timeout=self._ctx.command_timeout)
            self._client = client
            try:
                await sign_in(client, self._work, self._ctx.tokens)
                await sync.sync(client, folders)
                if stopping is None or not stopping.is_set():   # a sync cut short did not look at every folder
                    await self._report_missing(sync.missing_folders)
                await self._report(sync.warnings)
                self.last_sync = datetime.now().astimezone()
                if keep_open and stopping is not None and "IDLE" in client.capabilities and "INBOX" in (f.upper() for f in folders):
                    # Recorded now, not when the session ends: an idling session may last for days.
                    await self._working()
                    try:
                        await self._idle_loop(client, sync, folders, stopping)
                    except ConnectionFailed as exc:
                        raise ServerEndedSession(exc.message) from exc
                await client.logout()
            finally:
                self._client = None
                await client.close()

    async def _bind_server(self) -> None:
        """What ingest saved for this mailbox belongs to one server and account; pointed at another
        (its profile's host edited, another profile, other credentials), it starts afresh there."""
        profile = self._profile
        server = (f"{self.protocol}://{self._work.login_name()}@{str(profile['incoming_host']).lower()}:"
                  f"{profile['incoming_port']}")
        async with self._ctx.pool.acquire() as conn, conn.transaction():
            # Fenced like every save: a stale session must not make the holder's mailbox start afresh.
            await leases.hold(conn, self._work.id, self._ctx.lease_holder)
            if await state.bind_server(conn, self._work.id, server):
                log.warning("mailbox %s now reads %s: its saved folder states and server places are forgotten, "
                            "and mail already ingested is recognised by its keys", self._work.id, server)

    async def _report_missing(self, missing: set[str]) -> None:
        """A warning alert for each tracked folder the server lacks, once: again only after the
        folder was found in between (or ingest restarted)."""
        reported = self._ctx.missing_reported.get(self._work.id, frozenset())
        for folder in sorted(missing - reported):
            await self._ctx.registry.raise_alert(self._work.id, "warning", "incoming", "folder_missing",
                                                 f"the tracked folder {folder!r} does not exist on the server; it is skipped")
        # Only once said (an alert that failed to be raised is raised at the next session).  Kept
        # only while something is missing: the replica's mailboxes come and go.
        if missing:
            self._ctx.missing_reported[self._work.id] = frozenset(missing)
        else:
            self._ctx.missing_reported.pop(self._work.id, None)

    async def _report(self, warnings: list[tuple[str, str]]) -> None:
        """Raise (and clear) the warnings a sync collected: messages refused or skipped, a folder
        that could not be synced."""
        while warnings:
            code, text = warnings.pop(0)
            await self._ctx.registry.raise_alert(self._work.id, "warning", "incoming", code, text)

    async def _idle_loop(self, client: ImapClient, sync: ImapFolderSync, folders: list[str], stopping: asyncio.Event) -> None:
        inbox = next(f for f in folders if f.upper() == "INBOX")
        others = [f for f in folders if f.upper() != "INBOX"]
        loop = asyncio.get_running_loop()
        # On the polling interval, however busy the Inbox is: the other tracked folders, and for a
        # queue that deletes after processing, the removal of what evaluate has recorded since
        # (``ImapFolderSync.sync`` does both).  Idling alone would leave processed mail on the server.
        periodic = bool(others) or sync.deletes_processed
        periodic_due = loop.time() + self.interval if periodic else math.inf
        while not stopping.is_set():
            # Not longer than the idle check: IDLE alone never notices a connection gone silent (a
            # NAT or firewall dropped it, the server hung); the Inbox's look-up after it would time
            # out.  (RFC 2177 asks for a new IDLE at least every 29 minutes anyway.)
            period = min(periodic_due - loop.time(), self._ctx.idle_check)
            if period > 0:
                began = loop.time()
                idle = asyncio.ensure_future(client.idle(period))
                stop = asyncio.ensure_future(stopping.wait())
                await asyncio.wait([idle, stop], return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not idle.done():
                    idle.cancel()  # stopping: the session is closed right after
                    try:
                        await idle
                    except (asyncio.CancelledError, ConduitError):
                        pass
                    return
                if not idle.result() and loop.time() - began < period / 2:   # re-raises a failure
                    # The server ended the IDLE itself, early, with nothing new (some end each one at
                    # once): the Inbox is looked at on the polling interval then, never in a loop.
                    if await _stopped_within(stopping, min(self.interval, periodic_due - loop.time())):
                        return
            if loop.time() >= periodic_due:
                found = await sync.sync(client, others + [inbox])
                periodic_due = loop.time() + self.interval
            else:
                found = await sync.sync_folder(client, inbox)
            self.last_sync = datetime.now().astimezone()
            if found:
                await self._follow_up(client, sync, inbox, stopping, until=periodic_due)
            await self._report(sync.warnings)

    async def _follow_up(self, client: ImapClient, sync: ImapFolderSync, inbox: str, stopping: asyncio.Event, *,
                         until: float) -> None:
        """New mail came: poll with NOOP for a while before idling again, each new message restarting
        the while (but never past ``until``, the other folders' sync).  Dovecot tells an idling
        session of a change only 500 ms after it (its NOTIFY_DELAY_MSECS), and mail comes in bursts:
        the messages after the first are seen within a poll instead.  A quiet mailbox costs nothing:
        the polling only follows new mail."""
        follow = self._ctx.follow_up
        loop = asyncio.get_running_loop()
        quiet_at = loop.time() + follow.seconds
        while loop.time() < min(quiet_at, until):
            if await _stopped_within(stopping, follow.poll_seconds):
                return
            FOLLOW_UP_POLLS.inc()
            if await client.noop() and await sync.sync_folder(client, inbox):
                self.last_sync = datetime.now().astimezone()
                quiet_at = loop.time() + follow.seconds

    async def _pop3_session(self, stopping: asyncio.Event | None) -> None:
        profile = self._profile
        sync = Pop3Sync(self._ctx.pool, self._ctx.publisher, self._mailbox,  # type: ignore[arg-type]
                        delete_after_processing=bool(self._work["delete_after_processing"]), stopping=stopping)
        await self._bind_server()
        async with self._slot():
            client = await Pop3Client.connect(profile["incoming_host"], profile["incoming_port"],
                                              tls=profile["incoming_tls"], ssl_context=client_context(profile.get("tls_ca_file")),
                                              timeout=self._ctx.command_timeout)
            try:
                await sign_in(client, self._work, self._ctx.tokens)
                await sync.sync(client)
                await client.quit()
                await sync.confirm_removed()
                await self._report(sync.warnings)
                self.last_sync = datetime.now().astimezone()
            finally:
                await client.close()


async def sign_in(client: ImapClient | Pop3Client, work: MailboxWork, tokens: TokenProvider) -> None:
    """Sign in to an open IMAP or POP3 session as the mailbox: its (or its profile's) password, or
    XOAUTH2 with a token of the profile's OAuth client.  A refused token is forgotten, so the next
    attempt asks for a new one (it may have been revoked long before it expires)."""
    profile = work.profile
    if profile["auth_method"] == "profile_impersonation":
        # The profile's account signs in and acts as the mailbox's user (SASL PLAIN's authorization
        # identity); a plain LOGIN would open the service account's own mailbox for every user.
        service_user, password = work.login()
        await client.authenticate_plain(work["username"] or work.email, service_user, password.get_secret_value())
        return
    if profile["auth_method"] != "oauth2":
        user, password = work.login()
        await client.login(user, password.get_secret_value())
        return
    secret = work.cipher.decrypt(decode_bytea(profile["oauth_client_secret"])).get_secret_value()
    token = await tokens.token(profile["oauth_token_url"], profile["oauth_client_id"], secret, profile.get("oauth_scope"),
                               ca_file=profile.get("tls_ca_file"))
    try:
        await client.authenticate_xoauth2(work["username"] or work.email, token)
    except AuthenticationFailed:
        tokens.forget(token)
        raise
