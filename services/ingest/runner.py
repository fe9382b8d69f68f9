"""One mailbox's life in an ingest replica: connect with its profile's settings, sync, then wait
for news (IMAP IDLE, when a connection slot can be spared) or for the next poll.

Failures become mailbox state, not crashes: a wrong password, a refused connection, a TLS error or
a timeout records an alert, counts the error and backs the mailbox off (exponentially); the runner
ends and the scheduler starts a new one once the back-off is over.  The first success afterwards
records the recovery.  One mailbox's trouble never holds up another's.
"""
from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from aiokafka.errors import KafkaError

from services.ingest import state
from services.ingest.imap_client import ImapClient
from services.ingest.imap_sync import ImapFolderSync
from services.ingest.pop3_client import Pop3Client
from services.ingest.pop3_sync import Pop3Sync
from services.ingest.publishing import Mailbox
from shared.errors import AuthenticationFailed, ConduitError, InvalidInput
from shared.kafka import Publisher
from shared.metrics import FOLLOW_UP_POLLS, INFRASTRUCTURE_FAILURES, MAILBOX_FAILURES
from shared.oauth import TokenProvider
from shared.registry.service import MailboxWork, Registry, decode_bytea
from shared.tls import client_context

log = logging.getLogger(__name__)



class ServerSlots:
    """At most the profile's max concurrent connections per server, per replica.

    Counted per profile and server: two profiles that name one server each keep their own limit
    (one count shared by both would be reset by each in turn, and enforce neither)."""

    def __init__(self) -> None:
        self._slots: dict[tuple[object, str, int], tuple[int, asyncio.Semaphore]] = {}

    def for_server(self, profile_id: object, host: str, port: int, limit: int) -> asyncio.Semaphore:
        """The server's slots.  An edited limit starts a new count: the mailboxes' runners restart
        on a profile change, so sessions holding a slot of the old count end soon after."""
        key = (profile_id, host, port)
        slots = self._slots.get(key)
        if slots is None or slots[0] != limit:
            slots = self._slots[key] = (limit, asyncio.Semaphore(limit))
        return slots[1]


@dataclass(frozen=True)
class FollowUp:
    """How an idling session watches for more mail once some came (``IngestSettings.follow_up_*``)."""

    seconds: float = 0.0        # 0: idle again at once
    poll_seconds: float = 0.1


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


class MailboxRunner:
    def __init__(self, ctx: RunnerContext, work: MailboxWork, *, idle_allowed: bool) -> None:
        self._ctx = ctx
        self._work = work
        self._profile = work.profile
        self._idle_allowed = idle_allowed
        self._mailbox = Mailbox(work.id, work.organization_id, work["owner_kind"] is None)
        self.last_sync: datetime | None = None
        self.failed = False
        self._client: ImapClient | None = None  # the open IMAP session, if any

    @property
    def idling(self) -> bool:
        """True while the session waits in IMAP IDLE for the server to announce new mail."""
        return self._client is not None and self._client.idling

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

    def _slot(self) -> asyncio.Semaphore:
        return self._ctx.slots.for_server(self._profile["id"], self._profile["incoming_host"],
                                          self._profile["incoming_port"], self._profile["max_concurrent_connections"])

    async def run(self, stopping: asyncio.Event) -> None:
        """Sync until stopped or until a failure puts the mailbox into back-off."""
        while not stopping.is_set():
            if not await self.sync_once(stopping, keep_open=self._idle_allowed):
                return
            try:
                await asyncio.wait_for(stopping.wait(), timeout=self.interval)
            except asyncio.TimeoutError:
                pass

    async def sync_once(self, stopping: asyncio.Event | None = None, *, keep_open: bool = False) -> bool:
        """One session; with ``keep_open`` (IMAP IDLE) it lasts until stopped.  False on failure."""
        try:
            if self.protocol == "imap":
                await self._imap_session(stopping, keep_open)
            elif self.protocol == "pop3":
                await self._pop3_session()
            else:
                raise InvalidInput(f"incoming email over {self.protocol} is handled by exchange_sync, not ingest",
                                   reason="unsupported_profile")
        except ConduitError as exc:
            await self._failed(exc.reason, exc.message)
            return False
        except (asyncpg.PostgresError, asyncpg.InterfaceError, KafkaError) as exc:
            # Conduit's own database or broker failed, not the mailbox: no alert, no back-off of the
            # mailbox.  The session ends (nothing past the last saved batch counts as done) and the
            # runner tries again after its polling interval, not at once: a mail server is not asked
            # for the same messages in a loop while the broker is away.
            INFRASTRUCTURE_FAILURES.labels("ingest", type(exc).__name__).inc()
            log.warning("mailbox %s: ingest could not store or publish (%s: %s); trying again in %.0f s",
                        self._work.id, type(exc).__name__, exc, self.interval)
            return True
        except OSError as exc:
            await self._failed("connection_failed", f"connection error: {exc.strerror or exc}")
            return False
        except Exception as exc:  # noqa: BLE001 - a fault of ours or of a library, met with this mailbox
            # The mailbox backs off with an alert naming the failure, as for any other; the runner
            # dying instead would be started again within seconds, signing in each time.
            log.error("mailbox %s: unexpected failure while syncing", self._work.id, exc_info=exc)
            await self._failed("internal_error", f"unexpected {type(exc).__name__} while syncing (details in the ingest log)")
            return False
        if self.failed or self._work["incoming_error_count"]:
            await self._ctx.registry.record_success(self._work.id, "incoming")
            self.failed = False
        return True

    async def _failed(self, reason: str, message: str) -> None:
        self.failed = True
        MAILBOX_FAILURES.labels("incoming", reason).inc()
        log.warning("mailbox %s incoming failed: %s", self._work.id, message)
        await self._ctx.registry.record_failure(self._work.id, "incoming", reason, message)

    async def _imap_session(self, stopping: asyncio.Event | None, keep_open: bool) -> None:
        profile = self._profile
        sync = ImapFolderSync(self._ctx.pool, self._ctx.publisher, self._mailbox,  # type: ignore[arg-type]
                              received_after=profile.get("process_email_received_after") and
                              datetime.fromisoformat(profile["process_email_received_after"]),
                              delete_after_processing=bool(self._work["delete_after_processing"]))
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
                await self._report_missing(sync.missing_folders)
                await self._report(sync.warnings)
                self.last_sync = datetime.now().astimezone()
                if keep_open and stopping is not None and "IDLE" in client.capabilities and "INBOX" in (f.upper() for f in folders):
                    await self._idle_loop(client, sync, folders, stopping)
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
        async with self._ctx.pool.acquire() as conn:
            if await state.bind_server(conn, self._work.id, server):
                log.warning("mailbox %s now reads %s: its saved folder states and server places are forgotten, "
                            "and mail already ingested is recognised by its keys", self._work.id, server)

    async def _report_missing(self, missing: set[str]) -> None:
        for folder in sorted(missing):
            await self._ctx.registry.raise_alert(self._work.id, "warning", "incoming", "folder_missing",
                                                 f"the tracked folder {folder!r} does not exist on the server; it is skipped")

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
                idle.result()  # re-raise a failure of the session
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
            try:
                await asyncio.wait_for(stopping.wait(), timeout=follow.poll_seconds)
                return
            except TimeoutError:
                pass
            FOLLOW_UP_POLLS.inc()
            if await client.noop() and await sync.sync_folder(client, inbox):
                self.last_sync = datetime.now().astimezone()
                quiet_at = loop.time() + follow.seconds

    async def _pop3_session(self) -> None:
        profile = self._profile
        sync = Pop3Sync(self._ctx.pool, self._ctx.publisher, self._mailbox,  # type: ignore[arg-type]
                        delete_after_processing=bool(self._work["delete_after_processing"]))
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
