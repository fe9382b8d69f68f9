"""ingest: pulls email from IMAP and POP3 mailboxes into raw storage and `email.received`.

The scheduler keeps one runner per mailbox this replica holds a lease on.  Every few seconds it
asks the registry which mailboxes may be processed (`mailboxes_to_process("incoming")`), heartbeats,
renews and claims leases (its fair share), starts runners for new mailboxes, and stops runners for
mailboxes that were deactivated, lost their profile, went into back-off, changed settings or are to
be handed over to a replica that joined (their lease is released once the runner has stopped).  In
burst mode it syncs every mailbox it can claim once and returns (tests, one-shot runs).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from uuid import UUID

import asyncpg
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.ingest.leases import Leases
from services.ingest.runner import FollowUp, MailboxRunner, OutageLog, RunnerContext, ServerSlots
from shared.errors import raised_by_database
from shared.metrics import MAILBOXES_LEASED
from shared.oauth import TokenProvider
from shared.registry.service import MailboxWork
from shared.runtime import ServiceBase
from shared.settings import Settings

log = logging.getLogger(__name__)

INGEST_PROTOCOLS = ("imap", "pop3")


class IngestSettings(BaseSettings):
    """The ingest service's own settings (``CONDUIT_INGEST_*``), beside the process-wide ones."""

    model_config = SettingsConfigDict(env_prefix="CONDUIT_INGEST_", extra="ignore")

    # How often the scheduler heartbeats, renews and claims leases and looks for mailbox changes.
    refresh_seconds: float = Field(5.0, gt=0)
    # Leases and the replica heartbeat last this long unrenewed: a dead replica's mailboxes are
    # taken over, and it stops counting towards the fair share, after at most this long.
    lease_ttl_seconds: float = Field(30.0, gt=0)
    # After an idling session finds new mail: poll with NOOP this often, for this long (each new
    # message restarts it), before it idles again.  Dovecot tells an idling session of new mail only
    # 500 ms after it arrived; a NOOP learns of it at once, and mail comes in bursts.  0: off.  Every
    # 0.1 s rather than 0.05: half the NOOPs for 20 ms more at the median (docs/benchmarks.md).
    follow_up_seconds: float = Field(1.0, ge=0)
    follow_up_poll_seconds: float = Field(0.1, gt=0)
    # How long a session waits for a mail server's answer before it gives up (a `timeout` alert).
    command_timeout_seconds: float = Field(30.0, gt=0)
    # An idling session leaves IDLE this often to look at the Inbox.  IDLE alone never notices a
    # connection gone silent (a NAT or firewall dropped it, the server hung): new mail would go
    # unseen until the next look, which then times out and the session starts again.
    idle_check_seconds: float = Field(300.0, gt=0, le=25 * 60)
    # The server ended a working session (its BYE on a restart, or the connection closed): the
    # mailbox signs in again within seconds, and only if that has not worked for this long is it a
    # failure (alert, back-off).  A restart is routine and would otherwise back off every idling mailbox.
    reconnect_grace_seconds: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _renewed_in_time(self) -> IngestSettings:
        if self.lease_ttl_seconds < 2 * self.refresh_seconds:
            raise ValueError("CONDUIT_INGEST_LEASE_TTL_SECONDS must be at least twice CONDUIT_INGEST_REFRESH_SECONDS")
        return self


@dataclass
class _Running:
    task: asyncio.Task[None]
    stop: asyncio.Event
    version: object
    runner: MailboxRunner


class IngestService(ServiceBase):
    name = "ingest"
    pool_size = 20

    def __init__(self, settings: Settings, ingest: IngestSettings | None = None, *,
                 refresh_seconds: float | None = None) -> None:
        super().__init__(settings)
        self.options = ingest or IngestSettings()
        self.refresh_seconds = refresh_seconds or self.options.refresh_seconds
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.runners: dict[UUID, _Running] = {}
        self._slots = ServerSlots()
        self._tokens = TokenProvider()
        self._missing_reported: dict[UUID, frozenset[str]] = {}
        self._outage_log = OutageLog()

    def _context(self) -> RunnerContext:
        assert self.pool is not None and self.registry is not None
        return RunnerContext(self.pool, self.publisher, self.registry, self._slots, self._tokens,
                             FollowUp(self.options.follow_up_seconds, self.options.follow_up_poll_seconds),
                             self.options.command_timeout_seconds, self.options.idle_check_seconds,
                             reconnect_grace=self.options.reconnect_grace_seconds, lease_holder=self.holder,
                             missing_reported=self._missing_reported, outage_log=self._outage_log)

    async def _claimed(self, leases: Leases, *, fair_share: bool = True) -> tuple[dict[UUID, MailboxWork], set[UUID]]:
        """(mailboxes to work, mailboxes leased beyond our share: to stop, then release)."""
        assert self.registry is not None
        works = [w for w in await self.registry.mailboxes_to_process("incoming")
                 if w.profile["server_type"] in INGEST_PROTOCOLS]
        claim = await leases.claim([w.id for w in works], fair_share=fair_share)
        MAILBOXES_LEASED.set(len(claim.work))
        return {w.id: w for w in works if w.id in claim.work}, claim.surplus

    async def work(self, stopping: asyncio.Event, *, burst: bool) -> None:
        assert self.pool is not None
        leases = Leases(self.pool, self.holder, ttl_seconds=self.options.lease_ttl_seconds)
        try:
            if burst:
                claimed, surplus = await self._claimed(leases, fair_share=False)
                await leases.release(surplus)
                renewing = asyncio.create_task(self._renew(leases))
                try:
                    await self._sync_all_once(claimed)
                finally:
                    renewing.cancel()
                return
            renewed = time.monotonic()
            while not stopping.is_set():
                try:
                    claimed, surplus = await self._claimed(leases)
                    renewed = time.monotonic()
                    self._reconcile(claimed, stopping)
                    # A surplus lease goes back only once its runner has stopped: never two
                    # replicas in one mailbox.
                    await leases.release(m for m in surplus if m not in self.runners)
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                    # The database is briefly away: runners keep working on the leases they have
                    # while those are valid; the next pass renews them.  Past half their time to
                    # live, the runners stop, before another replica may take the mailboxes over.
                    log.warning("ingest %s could not renew its leases: %s", self.holder, exc)
                    if time.monotonic() - renewed > leases.ttl / 2:
                        self._reconcile({}, stopping)
                try:
                    await asyncio.wait_for(stopping.wait(), timeout=self.refresh_seconds)
                except TimeoutError:
                    pass
        finally:
            await self._stop_runners(list(self.runners))
            await leases.release_all()

    async def _renew(self, leases: Leases) -> None:
        """A one-shot run's leases outlive its sessions, however long a first sync takes: were they
        to run out, a replica would take the mailboxes over and the run's saves would be refused."""
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await leases.renew()
            except Exception as exc:  # noqa: BLE001 - whatever it was, the next turn tries again
                log.warning("ingest %s could not renew its leases: %s", self.holder, exc)

    async def _sync_all_once(self, claimed: dict[UUID, MailboxWork]) -> None:
        ctx = self._context()
        await asyncio.gather(*(MailboxRunner(ctx, w, idle_allowed=False).sync_once() for w in claimed.values()))

    def _reconcile(self, claimed: dict[UUID, MailboxWork], stopping: asyncio.Event) -> None:
        idle_allowed = self._idle_allowance(claimed)
        for mailbox_id, running in list(self.runners.items()):
            work = claimed.get(mailbox_id)
            # A runner whose IDLE allowance changed starts again: one that keeps idling after the
            # allowance shrank would hold the connection another mailbox needs to be polled.
            if (running.task.done() or work is None or _version(work) != running.version
                    or running.runner.idle_allowed != idle_allowed.get(mailbox_id, False)):
                running.stop.set()
            if running.task.done():
                # Kept until now so a stopping runner still counts as working its mailbox.
                del self.runners[mailbox_id]
                error = None if running.task.cancelled() else running.task.exception()
                if error is not None and _database_away(error):
                    # Recording the mailbox's own failure met the database away: no fault of ours.
                    log.warning("mailbox %s: its runner ended, the database being away (%s: %s); it starts "
                                "again with the database", mailbox_id, type(error).__name__, error)
                elif error is not None:
                    log.error("mailbox %s: runner failed", mailbox_id, exc_info=error)
        for mailbox_id, work in claimed.items():
            if mailbox_id in self.runners:
                continue  # running, or still finishing its previous session: started on a later pass
            stop = asyncio.Event()
            runner = MailboxRunner(self._context(), work, idle_allowed=idle_allowed.get(mailbox_id, False))
            task = asyncio.create_task(runner.run(_either(stop, stopping)), name=f"mailbox-{mailbox_id}")
            self.runners[mailbox_id] = _Running(task, stop, _version(work), runner)

    @staticmethod
    def _idle_allowance(claimed: dict[UUID, MailboxWork]) -> dict[UUID, bool]:
        """IDLE holds a connection for good: allow it while the server's connection budget lasts
        (per profile, as ``ServerSlots`` counts it), keeping one connection free for polling when
        there are more mailboxes than connections."""
        by_server: dict[tuple[object, str, int], list[MailboxWork]] = {}
        for w in claimed.values():
            if w.profile["server_type"] == "imap":
                key = (w.profile["id"], w.profile["incoming_host"], w.profile["incoming_port"])
                by_server.setdefault(key, []).append(w)
        allowed: dict[UUID, bool] = {}
        for works in by_server.values():
            limit = works[0].profile["max_concurrent_connections"]
            budget = limit if len(works) <= limit else limit - 1
            for i, w in enumerate(sorted(works, key=lambda w: w.id)):
                allowed[w.id] = i < budget
        return allowed

    async def _stop_runners(self, ids: list[UUID]) -> None:
        running = [self.runners.pop(i) for i in ids if i in self.runners]
        for r in running:
            r.stop.set()
        if running:
            await asyncio.gather(*(r.task for r in running), return_exceptions=True)


def _database_away(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached or was lost (not a query of ours it refused)."""
    if isinstance(exc, OSError):
        return raised_by_database(exc)
    return isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.OperatorInterventionError, asyncpg.InterfaceError))


def _version(work: MailboxWork) -> object:
    """What, when it changes, needs a new session: settings, credentials, profile."""
    return (work["updated_at"], work.profile.get("updated_at"))


def _either(a: asyncio.Event, b: asyncio.Event) -> asyncio.Event:
    """An event set when either is set (a runner stops for its own reason or the service's)."""
    both = asyncio.Event()

    async def watch() -> None:
        waiters = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        both.set()

    both._watcher = asyncio.ensure_future(watch())  # type: ignore[attr-defined]
    return both
