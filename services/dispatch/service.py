"""dispatch: sends the email other systems request on ``email.outbound``, exactly once.

Two loops meet in the send ledger (see docs/dispatch.md for the why):

- the **consumer** validates each batch of requests (schema, header allow-list, size, sender
  mailbox and its state; an invalid one is recorded as ``rejected``, announced on ``email.status``
  and dead-lettered), inserts the valid ones as ``pending_send`` in one transaction (a key already
  there is a no-op for the same request, and refuses another one), and returns: the offsets are
  committed once the requests are durable in the ledger, from which nothing is lost;
- the **send loop** claims due ``pending_send`` rows (``FOR UPDATE SKIP LOCKED``: replicas share
  them) as ``sending`` with their Message-ID and this worker's number, committed before any mail
  transaction starts, sends each at once over the transports' pools, and records outcomes
  (``sent`` with the activity, ``failed`` with the reason and reply, or back to ``pending_send``
  with ``next_attempt_at`` for a temporary failure).  One transaction records whatever finished
  since the last one and claims as many rows as the in-flight limit allows (a group commit), so
  the database work runs while the mail goes out, and a worker never holds more than
  ``wave_size`` rows in ``sending``: what a ``kill -9`` can leave ambiguous.

Rows of dead workers left in ``sending`` are resolved as an ambiguous outcome, never resent blindly.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
from pydantic import BaseModel, ConfigDict, ValidationError

from shared.consumer import Delivery, EventConsumer, Rejection
from shared.errors import (
    AuthenticationFailed,
    ConduitError,
    ConnectionFailed,
    InvalidInput,
    PermanentError,
    ProtocolTimeout,
    Refused,
    TlsFailed,
    TransientError,
)
from shared.events.envelope import utcnow
from shared.events.payloads import (
    ActivityCreatedV1,
    EmailOutboundV1,
    EmailStatusV1,
    RegardingRef,
)
from shared.events.topics import EMAIL_OUTBOUND
from shared.metrics import (
    ACTIVITIES_CREATED,
    EMAILS_SENT,
    MAILBOX_FAILURES,
    SEND_LATENCY,
)
from shared.mime import MAX_ID_LENGTH
from shared.rawstore import load_raw
from shared.registry.models import waiting_cause
from shared.registry.service import MailboxWork
from shared.runtime import ServiceBase
from shared.settings import Settings
from shared.tracking import make_tracking_token, normalize_subject, subject_with_token

from . import ledger
from .compose import check_attachments, check_headers, check_size, compose, message_id_for
from .exchange_transport import GRAPH_MAX_REQUEST_BYTES
from .settings import DispatchSettings
from .smtp_client import SmtpOutcomeUnknown, SmtpPermanentFailure, SmtpTemporaryFailure, recipient_deferred
from .starts import PLACES_PER_CONNECTION, StartGate
from .transports import Accepted, Transports, transport_name

GRAPH_MAX_MESSAGE_BYTES = GRAPH_MAX_REQUEST_BYTES * 3 // 4   # sendMail takes the MIME base64-encoded

log = logging.getLogger(__name__)

# Record-and-claim transactions a worker runs at once: one waits on PostgreSQL while the next forms.
_CONCURRENT_TURNS = 2
_REQUEUED = "the dispatch worker that claimed it stopped before handing it to the server; it is sent again"
# The first pause before looking in Sent Items again for a send whose answer was lost; it doubles.
_SENT_ITEMS_FIRST_PAUSE = 0.5


class _UncheckedOutbound(BaseModel):
    """The payload as it arrived: validated by the handler, so a schema error can be announced."""

    model_config = ConfigDict(extra="allow")


UNCHECKED_OUTBOUND = dataclasses.replace(EMAIL_OUTBOUND, payload=_UncheckedOutbound, envelope_checked=False)


@dataclass
class _Invalid:
    delivery: Delivery
    error: InvalidInput
    key: str | None
    data: dict[str, Any]
    mailbox_id: UUID | None = None


@dataclass
class _Result:
    row: asyncpg.Record
    work: MailboxWork | None
    transport: str | None
    request: EmailOutboundV1 | None
    accepted: Accepted | None = None
    error: BaseException | None = None
    postpone_until: datetime | None = None
    postpone_reason: tuple[str, str] = ("mailbox_backoff", "the mailbox is backing off after failures")


def _mailbox_level(exc: BaseException, transport: str | None) -> bool:
    """A failure of the mailbox or its server, not of this message: back off the mailbox."""
    if isinstance(exc, (AuthenticationFailed, TlsFailed)):
        return True
    if transport not in ("ews", "graph") and getattr(exc, "opening_session", False):
        # Refused or lost before any message was offered (a 554 or 421 greeting, EHLO and HELO
        # refused, a 454 to AUTH): the server's answer to the mailbox, whatever is being sent.
        return True
    if not isinstance(exc, (ConnectionFailed, ProtocolTimeout)):
        return False
    if transport in ("ews", "graph"):
        # Nothing was written: the server (or its token endpoint) could not be reached at all.  A
        # transport closed under the call (its profile was edited) is not the server's fault.
        # Nor is a call that waited in vain for one of the transport's own connections (transport_busy).
        return not getattr(exc, "after_write", False) and getattr(exc, "reason", None) not in ("transport_closed",
                                                                                                "transport_busy")
    return False


def _waiting(refusal: tuple[str, str]) -> tuple[str, str]:
    """The reason and detail of a request waiting for its mailbox to be mended."""
    return refusal[0], f"waiting: {refusal[1]}; sent once the mailbox may send again, until the request's deadline"


_TAGS = re.compile(r"<[^>]*>")


def _preview(request: EmailOutboundV1) -> str:
    text = request.text if request.text is not None else _TAGS.sub(" ", request.html or "")
    return " ".join(text.split())[:200]


class DispatchService(ServiceBase):
    name = "dispatch"
    pool_size = 12

    def __init__(self, settings: Settings, dispatch: DispatchSettings | None = None, *, group_id: str | None = None) -> None:
        super().__init__(settings)
        self.options = dispatch or DispatchSettings()
        self.group_id = group_id or self.options.group_id
        self.consumer: EventConsumer | None = None
        self.transports: Transports | None = None
        self.worker_id: int | None = None
        self._lock_conn: asyncpg.Connection | None = None
        self._lock_guard = asyncio.Lock()
        self._stopping = asyncio.Event()
        # The send loop's state: claimed rows not yet recorded (sending, or sent and awaiting the
        # next transaction), results waiting for that transaction, and what wakes the loop.
        self._claimed: set[UUID] = set()
        self._finished: list[_Result] = []
        self._wakeup = asyncio.Event()
        self._maybe_due = True
        # Requests this worker's consumer accepted as due and no send loop has claimed yet: the
        # consumer waits while there are too many (back-pressure: the backlog stays in Kafka).
        self._backlog: set[UUID] = set()
        self._room = asyncio.Event()
        self._works: dict[UUID, tuple[MailboxWork, float]] = {}
        self._requests: dict[UUID, EmailOutboundV1] = {}
        self._turns = 0  # record-and-claim transactions running (at most two)
        self._failures = 0
        self._turn_conns: list[asyncpg.Connection] = []
        self._due_generation = 0  # counts the consumer's acceptances of due requests
        self._reserved = 0  # rows those transactions may claim
        # Claiming transactions whose COMMIT was never confirmed (the connection broke): claim id ->
        # the room it holds until a turn has looked for what it claimed (``_unconfirmed``).
        self._unsettled: dict[UUID, int] = {}
        self._backoff: dict[UUID, datetime] = {}
        self.counts = {"sent": 0, "failed": 0, "rejected": 0, "retried": 0, "outcome_unknown": 0}
        self._starts: StartGate | None = None
        self._lock_is_lost = False

    # -- lifecycle

    async def on_start(self) -> None:
        assert self.pool is not None
        # A connection held for the worker's life: its advisory lock says "this worker is alive".
        self._lock_conn = await self.pool.acquire()
        self.worker_id = await ledger.register_worker(self._lock_conn)
        self._lock_conn.add_termination_listener(self._lock_lost)
        self.transports = Transports(timeout=self.options.smtp_timeout_seconds,
                                     data_timeout=self.options.smtp_data_timeout_seconds, helo_name=self.options.helo_name,
                                     sent_items_window=self.options.sent_items_window_seconds)
        self._starts = StartGate(self.pool, self.worker_id)
        # One handler call per fetch across partitions: a batch has a fixed cost (sender look-up,
        # ledger transaction) worth sharing, and Tansu brings a few records per partition per fetch.
        self.consumer = EventConsumer(self.settings, UNCHECKED_OUTBOUND, group_id=self.group_id, handler=self.handle,
                                      publisher=self.publisher, max_batch=self.options.batch_size,
                                      across_partitions=True, batch_window_ms=15, fetch_max_wait_ms=20,
                                      service="dispatch")
        await self.consumer.start()
        log.info("dispatch worker %d started", self.worker_id)

    async def on_stop(self) -> None:
        if self.pool is not None:
            while self._turn_conns:
                await self.pool.release(self._turn_conns.pop())
        if self.consumer is not None:
            await self.consumer.stop()
        if self.transports is not None:
            await self.transports.close()
        if self._starts is not None:
            await self._starts.close()
        if self._lock_conn is not None and self.pool is not None:
            conn, self._lock_conn = self._lock_conn, None
            if not self._lock_is_lost:
                conn.remove_termination_listener(self._lock_lost)
                await self.pool.release(conn)  # the reset releases the advisory lock

    def _lock_lost(self, _conn: object) -> None:
        """The connection holding this worker's advisory lock is gone (a failover, a reset): to the
        other workers this worker is now dead, and they take its rows back (the unstarted ones to be
        sent again, possibly by them).  Going on under its number would claim those rows again and
        have its started rows failed under it: the worker stops claiming at once, finishes and
        records what it has in flight (only the rows still its own), and ``work`` ends with an error,
        so that it is started again under a new number."""
        if self._lock_is_lost:
            return
        self._lock_is_lost = True
        log.warning("dispatch worker %s lost its database connection and with it its lock: stopping", self.worker_id)
        self._stopping.set()

    async def work(self, stopping: asyncio.Event, *, burst: bool) -> None:
        """The consumer and the send loop side by side; stopping stops both, the loop finishing its sends.

        Burst mode: consume until caught up, then send until nothing is due (nor due within the
        burst horizon), then return.
        """
        assert self.consumer is not None
        self._stopping = stopping
        if self._lock_is_lost:   # lost between the start and now: ``_lock_lost`` set the event work had then
            stopping.set()
        consumed = asyncio.Event()
        sending = asyncio.create_task(self._send_loop(stopping, consumed, burst=burst), name="dispatch-send")
        # A send loop that died would leave the consumer waiting for room: stop the service instead.
        sending.add_done_callback(lambda t: t.cancelled() or t.exception() is None or stopping.set())
        orphans = None if burst else asyncio.create_task(self._orphan_loop(stopping), name="dispatch-orphans")
        try:
            if burst:
                await self.recover_orphans()
            await self.consumer.run(stopping, burst=burst)
        except BaseException:
            stopping.set()
            raise
        finally:
            consumed.set()
            self._wakeup.set()
            if not burst:
                stopping.set()
            try:
                await sending
            finally:
                stopping.set()
                if orphans is not None:
                    await orphans
        if self._lock_is_lost:
            raise ConnectionFailed(f"dispatch worker {self.worker_id} lost the database connection that held its lock; "
                                   "it stopped so that no other worker's rows are sent under its number: start it again")

    def status(self) -> dict[str, Any]:
        return {"service": self.name, "worker": self.worker_id, **self.counts}

    # -- the consumer handler

    async def handle(self, deliveries: Sequence[Delivery]) -> Sequence[Rejection]:
        try:
            return await self._handle(deliveries)
        except asyncpg.DataError as exc:
            # PostgreSQL refused a value (SQLSTATE class 22): the same batch would fail again on every
            # retry.  InvalidInput makes the consumer handle the batch one request at a time, so the
            # one that cannot be stored is dead-lettered with this reason and the others go on.
            raise InvalidInput(f"the request could not be stored: {exc}", reason="unstorable") from exc

    async def _handle(self, deliveries: Sequence[Delivery]) -> Sequence[Rejection]:
        assert self.pool is not None and self.registry is not None
        invalid: list[_Invalid] = []
        valid: list[tuple[Delivery, EmailOutboundV1]] = []
        seen: dict[tuple[UUID, str], EmailOutboundV1] = {}
        repeated: list[tuple[Delivery, EmailOutboundV1]] = []
        for delivery in deliveries:
            data = dict(delivery.event.data.__pydantic_extra__ or {})  # the payload as it came (no fields declared)
            key = data.get("idempotency_key") if isinstance(data.get("idempotency_key"), str) else None
            try:
                if problem := EMAIL_OUTBOUND.envelope_problem(delivery.event):
                    raise InvalidInput(f"the event does not match email.outbound v1: {problem}", reason="schema_error")
                request = _validated(data)
                check_headers(request.headers)
                check_attachments(request)
                check_size(request, self.options.max_message_bytes)
            except InvalidInput as exc:
                invalid.append(_Invalid(delivery, exc, key if key and _printable(key) else None, data))
                continue
            natural_key = (delivery.event.organization_id, request.idempotency_key)
            first = seen.get(natural_key)
            if first is None:
                seen[natural_key] = request
                valid.append((delivery, request))
            elif request != first:
                # The same key twice in a batch: the first one stands, the same request again is a no-op,
                # and another one is refused as any request reusing a key is (``_accept_transaction``).
                repeated.append((delivery, request))

        senders = [(d.event.organization_id, r.mailbox_id, None if r.mailbox_id else r.sender_email) for d, r in valid]
        async with self.pool.acquire() as conn:
            distinct = list(dict.fromkeys(senders))
            found = dict(zip(distinct, await ledger.resolve_senders(conn, distinct)))
            mailbox_ids = {m for m in found.values() if m is not None}
            states = await ledger.mailbox_states(conn, mailbox_ids)
            orgs = await ledger.organizations(conn, {d.event.organization_id for d in deliveries})
            refs = {a.content_sha256 for _, r in valid for a in r.attachments if a.content_sha256}
            stored = await ledger.stored_content(conn, refs) if refs else {}
        eligible = {w.id: w for w in await self.registry.mailboxes_to_process("outgoing", mailbox_ids=list(mailbox_ids))} \
            if mailbox_ids else {}

        accepted: list[tuple[Delivery, EmailOutboundV1, asyncpg.Record, datetime | None]] = []
        for (delivery, request), sender in zip(valid, senders):
            mailbox_id = found[sender]
            problem = self._problem(delivery, request, mailbox_id, states, eligible, orgs, stored)
            if problem is not None:
                invalid.append(_Invalid(delivery, problem, request.idempotency_key, request.model_dump(mode="json"), mailbox_id))
                continue
            state = states[mailbox_id]  # type: ignore[index]
            postpone = state["outgoing_backoff_until"] if mailbox_id not in eligible and state["backed_off"] else None
            accepted.append((delivery, request, state, postpone))

        now = time.monotonic()
        self._remember(eligible, now)
        due = await self._accept(accepted, invalid, repeated, orgs)
        self.counts["rejected"] += len(invalid)
        if due:
            self._backlog.update(due)
            self._due_generation += 1
            self._maybe_due = True
            self._wakeup.set()
        # Back-pressure: the requests are safe in the ledger (the offsets may be committed), but a
        # consumer far ahead of its sends would only move the queue from Kafka into PostgreSQL.
        while len(self._backlog) > 2 * self.options.batch_size and not self._stopping.is_set():
            self._room.clear()
            await _first(self._room.wait(), self._stopping.wait())
        return [Rejection(i.delivery, i.error) for i in invalid]

    def _problem(self, delivery: Delivery, request: EmailOutboundV1, mailbox_id: UUID | None,
                 states: dict[UUID, asyncpg.Record], eligible: dict[UUID, MailboxWork],
                 orgs: dict[UUID, asyncpg.Record], stored: dict[str, int]) -> InvalidInput | None:
        if delivery.event.organization_id not in orgs:
            return Refused("no such organization", reason="unknown_organization")
        if mailbox_id is None:
            who = str(request.mailbox_id) if request.mailbox_id else request.sender_email
            return Refused(f"no mailbox, user or queue {who} in the organization", reason="unknown_mailbox")
        if mailbox_id not in eligible:
            refusal = ledger.refusal(states.get(mailbox_id))
            if refusal is not None:
                return Refused(refusal[1], reason=refusal[0])
        for attachment in request.attachments:
            if attachment.content_sha256 and attachment.content_sha256 not in stored:
                return Refused(f"attachment {attachment.filename!r} refers to content that is not stored",
                               reason="attachment_not_found")
        limit = self.options.max_message_bytes
        work = eligible.get(mailbox_id)
        if work is not None and transport_name(work) == "graph":
            limit = min(limit, GRAPH_MAX_MESSAGE_BYTES)   # refused by Graph: known now, not only at the send
        if limit < self.options.max_message_bytes or any(a.content_sha256 for a in request.attachments):
            try:
                check_size(request, limit, stored)   # with the stored sizes, and the transport's own limit
            except InvalidInput as exc:
                return exc
        return None

    async def _accept(self, accepted: list[tuple[Delivery, EmailOutboundV1, asyncpg.Record, datetime | None]],
                      invalid: list[_Invalid], repeated: list[tuple[Delivery, EmailOutboundV1]],
                      orgs: dict[UUID, asyncpg.Record]) -> list[UUID]:
        """One transaction: ledger rows, rejections, and their status events; returns the rows due now.
        The requests that reuse a key another request holds (``repeated``: those the batch held
        back) are added to ``invalid``.

        As many due rows as the in-flight limit leaves room for are written claimed, and their sends
        start once the transaction committed (no claim to wait for at low rates, one write less at high).
        """
        assert self.pool is not None and self.worker_id is not None
        room = max(0, self.options.wave_size - len(self._claimed) - self._reserved)
        self._reserved += room
        claim_id = ledger.new_id()
        try:
            due, claimed = await self._accept_transaction(accepted, invalid, repeated, orgs, room, claim_id)
        except Exception:
            self._unconfirmed(claim_id, room)
            raise   # the consumer retries the batch: its rows are in the ledger already if it committed
        finally:
            self._reserved -= room
        self._start_sends(claimed)
        return due

    async def _accept_transaction(self, accepted: list[tuple[Delivery, EmailOutboundV1, asyncpg.Record, datetime | None]],
                                  invalid: list[_Invalid], repeated: list[tuple[Delivery, EmailOutboundV1]],
                                  orgs: dict[UUID, asyncpg.Record], room: int,
                                  claim_id: UUID) -> tuple[list[UUID], list[asyncpg.Record]]:
        assert self.pool is not None and self.worker_id is not None
        now = utcnow()
        default_deadline = now + timedelta(seconds=self.options.default_deadline_seconds)
        events: list[tuple[str, str, Any]] = []
        async with self.pool.acquire() as conn, conn.transaction():
            wants_token = [r.track and orgs[d.event.organization_id]["tracking_token_enabled"] for d, r, _, _ in accepted]
            numbers = iter(await ledger.tracking_numbers(conn, sum(wants_token)))
            rows: list[ledger.NewRequest] = []
            for (delivery, request, state, postpone), token_wanted in zip(accepted, wants_token):
                org = orgs[delivery.event.organization_id]
                request_id = ledger.new_id()
                token = make_tracking_token(next(numbers), org["tracking_token_prefix"], org["tracking_token_digits"]) \
                    if token_wanted else None
                rows.append(ledger.NewRequest(
                    id=request_id, organization_id=delivery.event.organization_id,
                    idempotency_key=request.idempotency_key, mailbox_id=state["id"],
                    message_id=message_id_for(request_id, state["email"]),
                    subject=subject_with_token(request.subject, token) if token else request.subject,
                    tracking_token=token, next_attempt_at=postpone, deadline=request.deadline or default_deadline,
                    request=ledger.stored_request(request), event_id=delivery.event.event_id,
                    correlation_id=delivery.event.correlation_id, requested_at=delivery.event.occurred_at,
                    reason="mailbox_backoff" if postpone else None,
                    detail="the mailbox is backing off after failures; sending when it ends" if postpone else None,
                ))
            # A request whose deadline passed before it arrived (dispatch was down, say) is not claimed:
            # the send loop fails it as deadline_exceeded, as it does any request that waited too long.
            claim = set([r.id for r in rows if r.next_attempt_at is None and r.deadline >= now][:room])
            written = await ledger.insert_requests(conn, rows, claim, self.worker_id, claim_id)
            inserted = {r["id"] for r in written}
            for row in rows:
                if row.id in inserted:
                    events.append(ledger.status_event(row.organization_id, EmailStatusV1(
                        idempotency_key=row.idempotency_key, status="pending_send", request_id=row.id,
                        mailbox_id=row.mailbox_id, message_id=row.message_id, reason=row.reason, detail=row.detail,
                    ), row.correlation_id))
            claimed = [r for r in written if r["status"] == "sending"]
            events += [self._sending_event(r) for r in claimed]
            rejected = [i for i in invalid if i.key is not None]
            announce = await ledger.record_rejections(conn, [ledger.RejectedRequest(
                organization_id=i.delivery.event.organization_id, idempotency_key=i.key, mailbox_id=i.mailbox_id,  # type: ignore[arg-type]
                reason=i.error.reason, detail=i.error.message, request=i.data, event_id=i.delivery.event.event_id,
            ) for i in rejected])
            for item, yes in zip(rejected, announce):
                if yes:
                    events.append(ledger.status_event(item.delivery.event.organization_id, EmailStatusV1(
                        idempotency_key=item.key, status="rejected", mailbox_id=item.mailbox_id,  # type: ignore[arg-type]
                        reason=item.error.reason, detail=ledger.storable_text(item.error.message[:1000]),
                    ), item.delivery.event.correlation_id))
            # A key another request holds: the same request again (a redelivery, a re-publish) is a
            # no-op, its holder's statuses not repeated even if final; another one (another email under
            # the key) is refused, not recorded (the holder's row stays as it is) and not announced
            # (statuses are keyed by the key: a `rejected` would stand for the holder's outcome).
            # Looked up after the rejections are recorded, so that a key held by a request refused
            # earlier in this batch has its row.
            held = [(d, q, r.request) for r, (d, q, _, _) in zip(rows, accepted) if r.id not in inserted]
            held += [(d, q, ledger.stored_request(q)) for d, q in repeated]
            if held:
                holders = await ledger.key_holders(conn, [(d.event.organization_id, q.idempotency_key, stored)
                                                          for d, q, stored in held])
                invalid.extend(_Invalid(d, _key_reused(q.idempotency_key, holder["status"]), q.idempotency_key, {})
                               for (d, q, _), holder in zip(held, holders) if not holder["same"])
            await ledger.enqueue_events(conn, events)
        due = [r.id for r in rows if r.id in inserted and r.next_attempt_at is None and r.id not in claim]
        # The validated requests, so that the sends need not decode and validate them again.
        self._requests.update((r.id, a[1]) for r, a in zip(rows, accepted) if r.id in inserted and r.next_attempt_at is None)
        return due, claimed

    # -- sending

    def _sending_event(self, row: asyncpg.Record) -> tuple[str, str, Any]:
        return ledger.status_event(row["organization_id"], EmailStatusV1(
            idempotency_key=row["idempotency_key"], status="sending", request_id=row["id"], mailbox_id=row["mailbox_id"],
            message_id=row["message_id"], attempt=row["attempts"]), row["correlation_id"])

    async def _send_loop(self, stopping: asyncio.Event, consumed: asyncio.Event, *, burst: bool) -> None:
        """Claim, send, record, until stopped (or, in burst mode, until nothing is left to do).
        Stopped, it ends only once the consumer has returned (``consumed``): the consumer's accept
        transaction claims rows too, and what it claims while it finishes must still be recorded.

        Each turn is one transaction that records every result that came back since the last turn
        and claims due rows up to the in-flight limit; the claimed rows are sent at once, each on
        its own, while the next turns record and claim.  Two turns may run at a time, so one
        waits on PostgreSQL while the other is being prepared.  A row is committed as ``sending``
        before its mail transaction starts, and a turn only claims the room that committed (or
        being committed) outcomes leave: a worker never has more than ``wave_size`` rows in
        ``sending``, whatever order the turns commit in.
        """
        assert self.pool is not None
        turns: set[asyncio.Task[None]] = set()
        while True:
            self._wakeup.clear()
            if self._turns < _CONCURRENT_TURNS:
                finished, self._finished = self._finished, []
                room = 0 if stopping.is_set() else \
                    self.options.wave_size - len(self._claimed) - self._reserved + len(finished)
                want = room if self._maybe_due and room > 0 else 0
                if finished or want or self._unsettled:
                    self._turns += 1
                    self._reserved += want
                    turn = asyncio.ensure_future(self._turn(finished, want, stopping))
                    turns.add(turn)
                    turn.add_done_callback(turns.discard)
                    continue
            if not self._claimed and not self._turns:
                if stopping.is_set() and consumed.is_set():
                    return
                if burst and consumed.is_set():
                    await self.recover_orphans()
                    async with self.pool.acquire() as conn:
                        wait = await ledger.next_due_in(conn)
                    if wait is None or wait > self.options.burst_horizon_seconds:
                        return
                    await _first(asyncio.sleep(max(wait, 0.01)), stopping.wait())
                    self._maybe_due = True
                    continue
            # Wait for a send or a turn to finish, new requests, a stop, or the poll interval (retries come due).
            waiting = [self._wakeup.wait()] + ([] if stopping.is_set() else [stopping.wait()])
            if not await _first(*waiting, timeout=self.options.poll_seconds):
                self._maybe_due = True

    async def _turn(self, finished: list[_Result], want: int, stopping: asyncio.Event) -> None:
        generation = self._due_generation
        claim_id = ledger.new_id()
        unsettled, self._unsettled = self._unsettled, {}   # this turn looks for their rows
        try:
            claimed = await self._record_and_claim(finished, want, generation, claim_id, list(unsettled))
        except (OSError, asyncpg.PostgresError, ConduitError) as exc:
            # Most likely nothing of the turn was committed: the results wait for the next turn, after
            # a pause (recording them twice is a no-op), and so do the claims to look for.
            self._unsettled.update(unsettled)
            self._unconfirmed(claim_id, want)
            self._failures += 1
            delay = min(self.options.poll_seconds * 2 ** self._failures, 1.0 if stopping.is_set() else 30.0)
            delay *= random.uniform(0.5, 1.0)
            log.warning("recording outcomes failed (attempt %d), retrying in %.1fs: %s", self._failures, delay, exc)
            try:
                await asyncio.sleep(delay)  # back-off before the next attempt, not a synchronisation
            finally:
                self._finished = finished + self._finished
            return
        except BaseException:
            self._unsettled.update(unsettled)
            self._finished = finished + self._finished
            raise
        finally:
            self._turns -= 1
            self._reserved -= want
            self._wakeup.set()
        self._failures = 0
        self._reserved -= sum(unsettled.values())   # what they claimed, if anything, is in ``claimed`` now
        self._start_sends(claimed)
        try:
            await self._mailbox_recovered(finished)
        except (OSError, asyncpg.PostgresError, ConduitError) as exc:  # the next success tries again
            log.warning("clearing a recovered mailbox's failures failed: %s", exc)
        if want:
            self._backlog.difference_update(r["id"] for r in claimed)
            if not self._maybe_due and generation == self._due_generation:
                # Nothing else was due: whatever this worker accepted before, some worker has claimed.
                self._backlog.clear()
                self._requests.clear()
            self._room.set()

    def _unconfirmed(self, claim_id: UUID, room: int) -> None:
        """A transaction that claimed up to ``room`` rows failed.  It may have committed all the same:
        a connection that breaks after the server received the COMMIT loses only its answer.  Then
        the rows are ``sending`` for this worker, which does not know it: left so, they would wait
        for this worker to stop.  The next turn looks for them by ``claim_id`` and sends them;
        meanwhile their room stays reserved, so the in-flight limit holds either way."""
        if room:
            self._unsettled[claim_id] = room
            self._reserved += room
            self._wakeup.set()

    def _start_sends(self, claimed: list[asyncpg.Record]) -> None:
        """Each claimed row goes out at once, on its own; its result waits for the next turn."""
        for row in claimed:
            if row["id"] in self._claimed:
                # Already on its way here (claimed before, taken back while this worker seemed dead,
                # claimed again): one send per row, the task already running sends it.
                log.warning("request %s is already being sent by this worker; not started twice", row["id"])
                continue
            self._claimed.add(row["id"])
            entry = self._works.get(row["mailbox_id"])
            task = asyncio.ensure_future(self._send_one(row, entry[0] if entry is not None else None,
                                                        self._requests.pop(row["id"], None)))
            task.add_done_callback(functools.partial(self._sent, row))
        if claimed:
            self._wakeup.set()

    def _sent(self, row: asyncpg.Record, task: asyncio.Future[_Result]) -> None:
        if task.cancelled() or task.exception() is not None:
            # Interrupted somewhere inside the transport: it may have gone out, so it is never resent.
            result = _Result(row, None, None, None, error=SmtpOutcomeUnknown(
                f"the send was interrupted ({'cancelled' if task.cancelled() else repr(task.exception())})"))
        else:
            result = task.result()
        self._finished.append(result)
        self._wakeup.set()

    async def _record_and_claim(self, finished: list[_Result], want: int, generation: int, claim_id: UUID,
                                unsettled: list[UUID]) -> list[asyncpg.Record]:
        """One transaction: the outcomes of ``finished`` (with activities and events), up to ``want``
        claims (as ``claim_id``), and the rows claims ``unsettled`` made, if they committed
        (announced as `sending` by their own transaction)."""
        assert self.pool is not None and self.worker_id is not None
        outcomes, events = await self._outcomes(finished)
        async with self._turn_connection() as conn, conn.transaction():
            events = await self._write_outcomes(conn, finished, outcomes, events)
            claimed = await ledger.unsettled_claims(conn, unsettled, self.worker_id)
            if claimed:
                log.warning("%d requests claimed by a transaction whose commit was not confirmed are sent now",
                            len(claimed))
            if want:
                # Rows of mailboxes known to send go in one statement; only when those run out does
                # the turn look at the rest (other mailboxes, deadlines passed, back-offs).
                now, monotonic = utcnow(), time.monotonic()
                sending = [m for m, (_, at) in self._works.items() if monotonic - at < self.options.mailbox_refresh_seconds
                           and not (m in self._backoff and self._backoff[m] > now)]
                new = await ledger.claim_due(conn, sending, want, self.worker_id, claim_id)
                if len(new) < want:
                    rows = await ledger.lock_due(conn, want - len(new))
                    if len(rows) < want - len(new) and generation == self._due_generation:
                        self._maybe_due = False  # (unless the consumer accepted more since the turn began)
                    new += await self._claim_due(conn, rows, events, claim_id)
                events += [self._sending_event(r) for r in new]
                claimed += new
            await ledger.enqueue_events(conn, events)
        for result in finished:
            self._claimed.discard(result.row["id"])
        return claimed

    @contextlib.asynccontextmanager
    async def _turn_connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for a turn, kept between turns: the pool's reset on release is a round trip."""
        assert self.pool is not None
        conn = self._turn_conns.pop() if self._turn_conns else await self.pool.acquire()
        try:
            yield conn
        except BaseException:
            await self.pool.release(conn)  # the pool resets or replaces it
            raise
        if conn.is_closed():
            await self.pool.release(conn)
        else:
            self._turn_conns.append(conn)

    async def _claim_due(self, conn: asyncpg.Connection, rows: list[asyncpg.Record], events: list[Any],
                         claim_id: UUID) -> list[asyncpg.Record]:
        """Claim the locked due rows whose mailbox may send; postpone or fail the others."""
        assert self.worker_id is not None
        if not rows:
            return []
        works = await self._mailbox_works({r["mailbox_id"] for r in rows if r["mailbox_id"] is not None})
        unknown = {r["mailbox_id"] for r in rows if r["mailbox_id"] is not None and r["mailbox_id"] not in works}
        states = await ledger.mailbox_states(conn, unknown) if unknown else {}
        now = utcnow()
        to_claim: list[UUID] = []
        postponed: list[tuple[UUID, datetime, str | None, str | None]] = []
        failed: list[ledger.Outcome] = []
        for row in rows:
            mailbox_id = row["mailbox_id"]
            backoff = self._backoff.get(mailbox_id)
            if row["deadline"] is not None and row["deadline"] < now:
                last = f" (after {row['attempts']} attempt(s))"
                if row["reason"] in ledger.WAITING_FOR_MAILBOX:   # no error: the mailbox might not send
                    last += f"; it waited for its mailbox ({row['reason']}): {waiting_cause(row['detail'])}"
                elif row["reason"]:
                    last = f"; last error ({row['reason']}): {row['detail']}"
                failed.append(ledger.Outcome(row["id"], "failed", reason="deadline_exceeded", detail=(
                    f"the deadline passed before it could be sent{last}"),
                    smtp_code=row["smtp_code"], smtp_reply=row["smtp_reply"]))
            elif backoff is not None and backoff > now:  # this worker backed the mailbox off a moment ago
                postponed.append((row["id"], backoff, "mailbox_backoff", "the mailbox is backing off after failures"))
            elif mailbox_id in works:
                to_claim.append(row["id"])
            else:
                state = states.get(mailbox_id) if mailbox_id else None
                refusal = ledger.refusal(state)
                if refusal is not None and refusal[0] in ledger.PASSING_REFUSALS:
                    at = now + timedelta(seconds=self.options.unavailable_recheck_seconds)
                    reason, detail = _waiting(refusal)
                    postponed.append((row["id"], min(at, row["deadline"]) if row["deadline"] else at, reason, detail))
                    if row["reason"] != reason:   # said once, not at every look
                        events.append(ledger.status_event(row["organization_id"], EmailStatusV1(
                            idempotency_key=row["idempotency_key"], status="pending_send", request_id=row["id"],
                            mailbox_id=mailbox_id, reason=reason, detail=detail, message_id=row["message_id"],
                            attempt=row["attempts"]), row["correlation_id"]))
                elif refusal is not None:
                    failed.append(ledger.Outcome(row["id"], "failed", reason=refusal[0], detail=refusal[1]))
                elif state is not None and state["backed_off"]:
                    postponed.append((row["id"], state["outgoing_backoff_until"], "mailbox_backoff",
                                      "the mailbox is backing off after failures"))
                else:
                    to_claim.append(row["id"])
        await ledger.postpone(conn, postponed)
        written = await ledger.record_outcomes(conn, failed, None, from_status="pending_send")
        by_id = {r["id"]: r for r in rows}
        for o in failed:
            if o.id in written:
                r = by_id[o.id]
                events.append(ledger.status_event(r["organization_id"], EmailStatusV1(
                    idempotency_key=r["idempotency_key"], status="failed", request_id=o.id, mailbox_id=r["mailbox_id"],
                    reason=o.reason, detail=o.detail, smtp_code=o.smtp_code, smtp_reply=o.smtp_reply,
                    message_id=r["message_id"], attempt=r["attempts"]), r["correlation_id"]))
                self.counts["failed"] += 1
        return await ledger.claim(conn, to_claim, self.worker_id, claim_id)

    async def _mailbox_works(self, mailbox_ids: set[UUID]) -> dict[UUID, MailboxWork]:
        """The sending mailboxes, as the registry last said (at most ``mailbox_refresh_seconds`` ago)."""
        assert self.registry is not None
        now = time.monotonic()
        fresh = {m: self._works[m][0] for m in mailbox_ids
                 if m in self._works and now - self._works[m][1] < self.options.mailbox_refresh_seconds}
        missing = mailbox_ids - set(fresh)
        if missing:
            # Entries are replaced, never removed before the answer: a send starting meanwhile still
            # finds the mailbox (as the registry said a moment ago).
            found = {w.id: w for w in await self.registry.mailboxes_to_process("outgoing", mailbox_ids=list(missing))}
            self._remember(found, now)
            fresh.update(found)
            for m in missing - set(found):
                self._works.pop(m, None)
        return fresh

    def _remember(self, works: dict[UUID, MailboxWork], now: float) -> None:
        """What the registry says of sending mailboxes now.  It lists none that backs off, so a back-off
        this worker set ends here too: its server or credentials were edited since (the registry ended
        it), and the mailbox's requests go out now, not at the end of the back-off."""
        for m, work in works.items():
            self._works[m] = (work, now)
            self._backoff.pop(m, None)

    async def _send_one(self, row: asyncpg.Record, work: MailboxWork | None, request: EmailOutboundV1 | None) -> _Result:
        assert self.transports is not None and self.pool is not None
        result = _Result(row, work, transport_name(work) if work else None, None)
        try:
            # A request stored before a check was tightened fails it now: refused with its reason, not
            # retried as an internal error until its deadline.
            result.request = request if request is not None else _validated(row["request"])
            backoff = self._backoff.get(row["mailbox_id"])
            if backoff is not None and backoff > utcnow():  # a send claimed with it just backed it off
                result.postpone_until = backoff
                return result
            if work is None and row["mailbox_id"] is not None:
                # Dropped from the cache since the claim (a failure or a recovery elsewhere): ask again.
                work = (await self._mailbox_works({row["mailbox_id"]})).get(row["mailbox_id"])
                if work is None:
                    await self._not_sendable(result)
                    return result
                result.work, result.transport = work, transport_name(work)
            if work is None:
                raise InvalidInput("the mailbox may no longer send", reason="mailbox_unavailable")
            assert self._starts is not None
            # Its start committed first: if this worker dies, a row that never reached the transport is
            # sent again by another, and only one that may have left fails as outcome_unknown.
            places = PLACES_PER_CONNECTION * int(work.profile["max_concurrent_connections"] or 1)
            place = await self._starts.enter(work.id, places)
            try:
                # Asked again once it has a place: a mailbox deactivated (or moved, or no longer approved)
                # while its requests waited for places sends nothing more than the few already cleared.
                work = (await self._mailbox_works({work.id})).get(work.id)
                if work is None:
                    await self._not_sendable(result)
                    return result
                result.work, result.transport = work, transport_name(work)
                attachments: dict[str, bytes] = {}
                refs = {a.content_sha256 for a in result.request.attachments if a.content_sha256}
                if refs:
                    async with self.pool.acquire() as conn:
                        attachments = await load_raw(conn, refs)
                composed = compose(result.request, sender_email=work.email, sender_name=work["name"],
                                   subject=row["subject"], message_id=row["message_id"], attachments=attachments,
                                   date=row["created_at"], max_bytes=self.options.max_message_bytes,
                                   bcc_header=result.transport != "smtp")
                if result.transport in ("ews", "graph") and row["attempts"] > 1 and await self._sent_earlier(row, work):
                    result.accepted = Accepted(reply="found in the mailbox's Sent Items before sending again: "
                                                     "an earlier attempt went out")
                    return result
                if not await self._starts.clear(row["id"]):
                    raise TransientError("another worker took the request back (this one had lost its lock)",
                                         reason="not_ours")
                # After a partial acceptance, only the recipients the server deferred are owed.
                result.accepted = await self.transports.send(work, composed.raw,
                                                             row["deferred_recipients"] or composed.recipients)
            finally:
                place.release()
        except Exception as exc:  # noqa: BLE001 - every failure becomes an outcome below
            result.error = exc
            if result.transport in ("ews", "graph") and getattr(exc, "request_sent", False):
                await self._lost_exchange_reply(result, exc)
        return result

    async def _sent_earlier(self, row: asyncpg.Record, work: MailboxWork) -> bool:
        """Before an Exchange send is tried again: whether an earlier attempt went out after all.

        A gateway's 5xx after which the message was not in Sent Items within the window is retried,
        and Exchange may file its copy later than that; so every retry through Exchange looks once
        more first.  A look-up that fails is that failure (retried, or the mailbox backed off), never a
        blind resend.
        """
        assert self.transports is not None
        try:
            return bool(await asyncio.wait_for(self.transports.find_sent(work, row["message_id"]),
                                               timeout=self.options.smtp_timeout_seconds))
        except TimeoutError:
            raise TransientError("the Sent Items look-up before sending again timed out", reason="timeout") from None

    async def _not_sendable(self, result: _Result) -> None:
        """The claimed row's mailbox may not send now: wait for its back-off, or fail with the refusal."""
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            state = (await ledger.mailbox_states(conn, {result.row["mailbox_id"]})).get(result.row["mailbox_id"])
        refusal = ledger.refusal(state)
        if refusal is None and state is not None and state["backed_off"]:
            result.postpone_until = state["outgoing_backoff_until"]
        elif refusal is not None and refusal[0] in ledger.PASSING_REFUSALS:
            result.postpone_until = utcnow() + timedelta(seconds=self.options.unavailable_recheck_seconds)
            result.postpone_reason = _waiting(refusal)
        else:
            reason, detail = refusal or ("mailbox_unavailable", "the mailbox may no longer send")
            result.error = InvalidInput(detail, reason=reason)

    async def _lost_exchange_reply(self, result: _Result, exc: Exception) -> None:
        """Exchange got the request but no answer came back: sent or not, only Sent Items can say.

        Found there, at once or within ``sent_items_window_seconds`` (Graph answers ``202 Accepted``
        before it has sent, and files its copy seconds later): sent.  Not found (or the look-ups
        failing): the outcome is unknown, and like an SMTP reply lost after the final dot it is never
        resent (Exchange may still deliver it).  The look-ups run in this message's own send task, so
        the send loop goes on meanwhile; the row holds one of the worker's ``wave_size`` places.
        """
        row, work = result.row, result.work
        assert work is not None
        started = time.monotonic()
        window = self.options.sent_items_window_seconds
        if await self._in_sent_items(row, work, until=started + window):
            result.error = None
            result.accepted = Accepted(reply=f"found in the mailbox's Sent Items {time.monotonic() - started:.1f} s "
                                             f"after the answer was lost ({_message(exc)})")
            return
        looked = time.monotonic() - started
        # A stop ends the look-ups early: the send is recorded as interrupted (outcome unknown), as
        # any send the stop cut short, and the service does not wait out the window.
        cut_short = " (cut short: the service is stopping)" if self._stopping.is_set() and looked < window else ""
        result.error = SmtpOutcomeUnknown(
            f"{_message(exc)} after the request was sent, and the message is not in the mailbox's Sent Items "
            f"(looked for {looked:.1f} s{cut_short})")

    async def _outcomes(self, results: list[_Result]) -> tuple[list[ledger.Outcome], list[Any]]:
        """Turn results into ledger outcomes; mailbox-level failures back the mailbox off first."""
        assert self.registry is not None
        now = utcnow()
        backoff = self._backoff
        for mailbox_id in [m for m, until in backoff.items() if until <= now]:
            del backoff[mailbox_id]
        for result in results:
            exc, mailbox_id = result.error, result.row["mailbox_id"]
            if exc is not None and _mailbox_level(exc, result.transport) and mailbox_id not in backoff:
                reason = getattr(exc, "reason", "error")
                MAILBOX_FAILURES.labels("outgoing", reason).inc()
                backoff[mailbox_id] = await self.registry.record_failure(
                    mailbox_id, "outgoing", reason, f"sending failed: {_message(exc)}")
                self._works.pop(mailbox_id, None)
        outcomes: list[ledger.Outcome] = []
        for result in results:
            row, exc = result.row, result.error
            outcome = ledger.Outcome(row["id"], "failed", transport=result.transport)
            if result.accepted is not None:
                outcome.status = "sent"
                outcome.smtp_code, outcome.smtp_reply = result.accepted.code, result.accepted.reply
                refused = result.accepted.refused_recipients
                if refused:
                    listed = ", ".join(f"{a} ({c} {t})" for a, (c, t) in list(refused.items())[:10])
                    outcome.reason = "partially_sent"
                    outcome.detail = f"accepted, but the server refused {len(refused)} recipient(s): {listed}"
                    # RFC 5321 4.2.5: a 4xx to RCPT asks to try that recipient later (so does a server's
                    # recipient limit: ``recipient_deferred``).  The same bytes go to those recipients
                    # only, so nobody who has the message gets it twice.
                    deferred = [address for address, (code, text) in refused.items() if recipient_deferred(code, text)]
                    if deferred:
                        self._retry(outcome, row, now, "recipients_deferred", outcome.detail)
                        outcome.deferred_recipients = deferred
            elif result.postpone_until is not None:
                self._retry(outcome, row, now, *result.postpone_reason, at=result.postpone_until)
            elif isinstance(exc, SmtpOutcomeUnknown):
                outcome.reason, outcome.detail = "outcome_unknown", (
                    f"{_message(exc)}; not resent, so that it cannot arrive twice (Message-ID <{row['message_id']}>)")
                self.counts["outcome_unknown"] += 1
            elif exc is not None and _mailbox_level(exc, result.transport):
                self._retry(outcome, row, now, getattr(exc, "reason", "error"), _message(exc), at=backoff[row["mailbox_id"]])
            elif isinstance(exc, (SmtpPermanentFailure, SmtpTemporaryFailure)):
                outcome.smtp_code, outcome.smtp_reply = exc.code, exc.text
                outcome.reason, outcome.detail = exc.reason, _message(exc)
                if isinstance(exc, SmtpTemporaryFailure):
                    self._retry(outcome, row, now, exc.reason, _message(exc))
            elif isinstance(exc, (InvalidInput, PermanentError)):
                outcome.reason, outcome.detail = exc.reason, _message(exc)
            elif isinstance(exc, TransientError):
                self._retry(outcome, row, now, exc.reason, _message(exc), hint=getattr(exc, "retry_after", None))
            elif exc is not None:
                log.error("unexpected failure sending request %s: %r", row["id"], exc, exc_info=exc)
                self._retry(outcome, row, now, "internal_error", f"unexpected {type(exc).__name__}")
            if outcome.status == "failed" and (row["deferred_recipients"] or outcome.deferred_recipients):
                # An earlier attempt reached the other recipients: the request was sent, and the
                # recipients deferred until now are named as never reached.
                owed = ", ".join((row["deferred_recipients"] or outcome.deferred_recipients)[:10])
                outcome.status, outcome.next_attempt_at, outcome.deferred_recipients = "sent", None, None
                outcome.detail = f"sent to the other recipients; not to {owed}: {outcome.reason}: {outcome.detail}"
                outcome.reason = "partially_sent"
            outcomes.append(outcome)
        return outcomes, []

    def _retry(self, outcome: ledger.Outcome, row: asyncpg.Record, now: datetime, reason: str, detail: str,
               *, at: datetime | None = None, hint: float | None = None) -> None:
        """Back to pending_send after capped exponential back-off with jitter, or failed past the deadline."""
        attempt = max(1, row["attempts"])
        delay = min(self.options.retry_cap_seconds, self.options.retry_base_seconds * 2 ** (attempt - 1))
        delay *= random.uniform(0.5, 1.0)
        when = now + timedelta(seconds=max(delay, hint or 0.0))
        if at is not None:
            when = max(when, at)
        outcome.reason, outcome.detail = reason, detail
        if row["deadline"] is not None and when > row["deadline"]:
            outcome.status = "failed"
            outcome.reason = "deadline_exceeded"
            outcome.detail = f"gave up at the deadline after {attempt} attempt(s); last error ({reason}): {detail}"
            return
        outcome.status, outcome.next_attempt_at = "pending_send", when

    async def _write_outcomes(self, conn: asyncpg.Connection, results: list[_Result], outcomes: list[ledger.Outcome],
                              events: list[Any], *, worker_id: int | None = None) -> list[Any]:
        """Activities, outcomes (of rows ``worker_id``, by default this worker, still holds) and their events."""
        assert self.worker_id is not None
        activities: list[ledger.SentActivity] = []
        for result, outcome in zip(results, outcomes):
            if outcome.status == "sent" and result.request is not None and result.request.track and result.work is not None:
                activities.append(self._activity(result))
        by_message = {a.message_id: a for a in activities}
        written = await ledger.record_outcomes(conn, outcomes, worker_id or self.worker_id, activities=activities)
        for outcome in outcomes:
            outcome.activity_id = written.get(outcome.id) if outcome.status == "sent" else None
        now = utcnow()
        tally: collections.Counter[tuple[str, str]] = collections.Counter()  # metrics, counted once per turn
        activities_created = 0
        for result, outcome in zip(results, outcomes):
            row = result.row
            if outcome.id not in written:
                log.warning("request %s was no longer ours to record (%s)", row["id"], outcome.status)
                continue
            events.append(ledger.status_event(row["organization_id"], EmailStatusV1(
                idempotency_key=row["idempotency_key"], status=outcome.status, request_id=row["id"],
                mailbox_id=row["mailbox_id"], reason=outcome.reason, detail=outcome.detail, smtp_code=outcome.smtp_code,
                smtp_reply=outcome.smtp_reply, message_id=row["message_id"], activity_id=outcome.activity_id,
                attempt=row["attempts"]), row["correlation_id"]))
            if outcome.status == "sent":
                self.counts["sent"] += 1
                tally[("sent", outcome.transport or "smtp")] += 1
                if row["requested_at"] is not None:
                    SEND_LATENCY.observe(max(0.0, (now - row["requested_at"]).total_seconds()))
                activity = by_message.get(row["message_id"])
                if activity is not None and outcome.activity_id == activity.id:
                    activities_created += 1
                    # sent_at: the server accepted it since the last turn, moments before now (the
                    # stored email_activity.sent_at is this transaction's start, a moment earlier still).
                    events.append(ledger.activity_event(row["organization_id"], ActivityCreatedV1(
                        activity_id=activity.id, message_id=activity.message_id, direction="outgoing", status="sent",
                        subject=activity.subject, from_address=activity.from_address, to_addresses=activity.to,
                        cc_addresses=activity.cc, bcc_addresses=list(result.request.bcc) if result.request else [],
                        mailbox_ids=[activity.mailbox_id],
                        regarding=RegardingRef(kind=activity.regarding_kind, id=activity.regarding_id)
                        if activity.regarding_id else None,
                        tracking_token=activity.tracking_token, sent_at=now), row["correlation_id"]))
            elif outcome.status == "failed":
                self.counts["failed"] += 1
                tally[("failed", outcome.transport or "none")] += 1
            else:
                self.counts["retried"] += 1
        for labels, n in tally.items():
            EMAILS_SENT.labels(*labels).inc(n)
        if activities_created:
            ACTIVITIES_CREATED.labels("outgoing").inc(activities_created)
        return events

    def _activity(self, result: _Result) -> ledger.SentActivity:
        row, request, work = result.row, result.request, result.work
        assert request is not None and work is not None
        references = request.headers.get("References") or next(
            (v for k, v in request.headers.items() if k.lower() == "references"), None)
        root = references.split()[0].strip("<>") if references else row["message_id"]
        if len(root.encode()) > MAX_ID_LENGTH:   # an indexed column, as the Message-ID (shared/mime.py)
            root = row["message_id"]
        token = row["tracking_token"]
        prefix = token.rstrip("0123456789") if token else ""
        digits = len(token) - len(prefix) if token else 0
        subject = row["subject"]
        return ledger.SentActivity(
            id=ledger.new_id(), request_id=row["id"], organization_id=row["organization_id"], mailbox_id=work.id,
            message_id=row["message_id"],
            subject=subject, normalized_subject=normalize_subject(subject, prefix, digits), from_address=work.email, to=list(request.to),
            cc=list(request.cc), regarding_kind=request.regarding.kind if request.regarding else None,
            regarding_id=request.regarding.id if request.regarding else None, tracking_token=token,
            thread_root=root, preview=_preview(request))

    async def _mailbox_recovered(self, results: list[_Result]) -> None:
        assert self.registry is not None
        done: set[UUID] = set()
        for result in results:
            work = result.work
            if result.accepted is not None and work is not None and work.id not in done and work["outgoing_error_count"]:
                done.add(work.id)
                await self.registry.record_success(work.id, "outgoing")
                self._works.pop(work.id, None)  # its error count is cleared: read it afresh

    # -- retries and orphans

    async def _orphan_loop(self, stopping: asyncio.Event) -> None:
        """Every few poll intervals (and at start), resolve the rows of dead workers, and close the
        connections of mailboxes that no longer send."""
        while not stopping.is_set():
            if self.transports is not None:
                self.transports.sweep_idle()
            try:
                await self.recover_orphans()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ConduitError) as exc:
                log.warning("looking for the rows of dead workers failed, trying again shortly: %s", exc)
            await _first(stopping.wait(), timeout=self.options.poll_seconds * 5)

    async def recover_orphans(self) -> int:
        """Resolve rows left in `sending` by dead workers: sent again if they never reached a transport,
        else ambiguous, so failed, never resent blindly."""
        assert self.pool is not None and self._lock_conn is not None and self.worker_id is not None
        async with self.pool.acquire() as conn:
            workers = await ledger.orphan_workers(conn, self.worker_id)
        resolved = 0
        for worker_id in workers:
            async with self._lock_guard:
                if not await ledger.try_lock_worker(self._lock_conn, worker_id):
                    continue  # alive: its lock is held
                try:
                    resolved += await self._resolve_orphans(worker_id)
                finally:
                    await ledger.unlock_worker(self._lock_conn, worker_id)
        return resolved

    async def _resolve_orphans(self, worker_id: int) -> int:
        """The rows a dead worker left in ``sending``.

        Those it had not yet cleared to reach a transport (no ``started_at``, starts.py) never left:
        they go back to ``pending_send`` and are sent again.  The others are ambiguous, unless the
        mailbox says otherwise.  An Exchange mailbox keeps a copy of what it sent (EWS
        ``SendAndSaveCopy``, Graph ``sendMail``): a Message-ID found in its Sent Items was sent, and
        is recorded so (with its activity).  Anything
        else (not found, SMTP, the look-up failing) is ``failed`` with ``outcome_unknown``, never resent.
        A row gets what is left of ``sent_items_window_seconds`` counted from its ``created_at`` (no
        later than its claim): a worker that died a moment after a Graph ``sendMail`` left a copy that
        may not be filed yet, while the rows of a worker long dead are looked up once.  The rows are
        looked up one after the other, so the whole costs about one window, not one per row.  A stop
        leaves the rows not yet resolved in ``sending``, for whichever worker looks next.
        Holding the dead worker's lock keeps other workers off these rows, so the look-ups run outside
        any transaction.
        """
        assert self.pool is not None and self.transports is not None
        async with self.pool.acquire() as conn:
            rows = await ledger.sending_of(conn, worker_id)
        if not rows:
            return 0
        # Never cleared to reach a transport (starts.py): nothing of them left, so they are sent again.
        unstarted = [r["id"] for r in rows if r["started_at"] is None]
        rows = [r for r in rows if r["started_at"] is not None]
        works = await self._mailbox_works({r["mailbox_id"] for r in rows if r["mailbox_id"] is not None})
        found: list[_Result] = []
        unknown: list[asyncpg.Record] = []
        window, now, monotonic = self.options.sent_items_window_seconds, utcnow(), time.monotonic()
        for row in rows:
            if self._stopping.is_set():
                break  # the rest stay in `sending`, for whichever worker looks next
            work = works.get(row["mailbox_id"])
            age = (now - row["created_at"]).total_seconds() if row["created_at"] is not None else window
            request = None
            if await self._in_sent_items(row, work, until=monotonic + min(window, max(0.0, window - age))):
                try:
                    request = EmailOutboundV1.model_validate(row["request"])
                except ValidationError:
                    log.warning("request %s was found in Sent Items but its stored request is unreadable", row["id"])
            if request is not None and work is not None:
                found.append(_Result(row, work, transport_name(work), request, accepted=Accepted(
                    reply="found in the mailbox's Sent Items after the worker that sent it stopped")))
            elif self._stopping.is_set():
                break  # its look-ups were cut short: it stays in `sending`, as the rest do
            else:
                unknown.append(row)
        async with self.pool.acquire() as conn, conn.transaction():
            requeued = await ledger.requeue_unstarted(conn, unstarted, worker_id, _REQUEUED)
            outcomes = [ledger.Outcome(
                r["id"], "failed", reason="outcome_unknown",
                detail=("the dispatch worker stopped while the message was being sent; the server may have "
                        f"accepted it, so it is not resent (look for Message-ID <{r['message_id']}>)"),
            ) for r in unknown]
            written = await ledger.record_outcomes(conn, outcomes, worker_id)
            events = [ledger.status_event(r["organization_id"], EmailStatusV1(
                idempotency_key=r["idempotency_key"], status="failed", request_id=r["id"], mailbox_id=r["mailbox_id"],
                reason="outcome_unknown", detail=o.detail, message_id=r["message_id"], attempt=r["attempts"]),
                r["correlation_id"]) for r, o in zip(unknown, outcomes) if r["id"] in written]
            events += [ledger.status_event(r["organization_id"], EmailStatusV1(
                idempotency_key=r["idempotency_key"], status="pending_send", request_id=r["id"], mailbox_id=r["mailbox_id"],
                reason="worker_stopped", detail=_REQUEUED, message_id=r["message_id"], attempt=r["attempts"]),
                r["correlation_id"]) for r in requeued]
            sent, more = await self._outcomes(found)
            events = await self._write_outcomes(conn, found, sent, events + more, worker_id=worker_id)
            await ledger.enqueue_events(conn, events)
        if requeued:
            log.warning("worker %d died with %d claimed request(s) not yet handed to a transport: pending again",
                        worker_id, len(requeued))
            self._maybe_due = True
            self._wakeup.set()
        if unknown:
            log.warning("worker %d died with %d request(s) in flight: marked failed (outcome_unknown)", worker_id, len(unknown))
            self.counts["outcome_unknown"] += len(unknown)
        if found:
            log.warning("worker %d died with %d request(s) in flight found in Sent Items: marked sent", worker_id, len(found))
        return len(found) + len(unknown) + len(requeued)

    async def _in_sent_items(self, row: asyncpg.Record, work: MailboxWork | None, *, until: float = 0.0) -> bool:
        """Whether the row's Message-ID is in the mailbox's Sent Items (never, for SMTP: it keeps no copy).

        Not found: looked up again after growing pauses until ``until`` (``time.monotonic()``), and a
        last time then, because Graph files its copy seconds after answering ``sendMail``.  A look-up
        that fails counts as not found; each is bounded by ``smtp_timeout_seconds``.  The service
        stopping ends the pauses at once: a stop never waits out the window.
        """
        if work is None or transport_name(work) == "smtp":
            return False
        pause = _SENT_ITEMS_FIRST_PAUSE
        while True:
            if await self._look_in_sent_items(row, work):
                return True
            left = until - time.monotonic()
            if left <= 0 or self._stopping.is_set():
                return False
            if await _first(self._stopping.wait(), timeout=min(pause, left)):
                return False
            pause *= 2

    async def _look_in_sent_items(self, row: asyncpg.Record, work: MailboxWork) -> bool:
        """One look-up."""
        assert self.transports is not None
        try:
            return bool(await asyncio.wait_for(self.transports.find_sent(work, row["message_id"]),
                                               timeout=self.options.smtp_timeout_seconds))
        except (TimeoutError, ConduitError, OSError) as exc:
            log.warning("could not look for request %s in Sent Items: %s", row["id"], exc)
            return False


async def _first(*waits: Any, timeout: float | None = None) -> bool:
    """Wait until the first of ``waits`` (coroutines) finishes, or ``timeout``; False on timeout."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for task in tasks:
            task.cancel()


def _validated(data: dict[str, Any]) -> EmailOutboundV1:
    try:
        return EmailOutboundV1.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'data'}: {e['msg']}" for e in exc.errors()[:5])
        injection = any("header injection" in str(e.get("msg", "")) for e in exc.errors())
        # A header injection is a request read and refused by a rule; any other mismatch, one not understood.
        kind = Refused if injection else InvalidInput
        raise kind(f"the request does not match email.outbound v1: {problems}",
                   reason="header_injection" if injection else "schema_error") from exc


def _key_reused(key: str, status: str | None) -> Refused:
    # No row holds the key when the request before it in the batch was refused for an organization
    # that does not exist.
    return Refused(f"the idempotency key {key!r} is already used by a different request ({status or 'rejected'}): "
                   "a different email needs a key of its own", reason="idempotency_key_reused")


def _printable(text: str) -> bool:
    return 0 < len(text) <= 200 and not any(c in text for c in "\r\n\x00")


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, ConduitError) else str(exc) or type(exc).__name__
