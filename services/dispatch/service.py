"""dispatch: sends the email other systems request on ``email.outbound``, exactly once.

The flow of one consumer batch (see docs/dispatch.md for the why):

1. validate every request (schema, header allow-list, size, sender mailbox and its state); an
   invalid one is recorded as ``rejected``, announced on ``email.status`` and dead-lettered;
2. one transaction inserts the batch into the send ledger (``pending_send``; a key already there
   is a no-op) and claims the first wave (``sending``, with its Message-ID and this worker's
   number): committed before any mail transaction starts;
3. each wave is sent concurrently over the transports' pools; one transaction records its
   outcomes (``sent`` with the activity, ``failed`` with the reason and reply, or back to
   ``pending_send`` with ``next_attempt_at`` for a temporary failure) and claims the next wave;
4. the handler returns, the offsets are committed.

A retry loop picks due ``pending_send`` rows (``FOR UPDATE SKIP LOCKED``: replicas share them) and
resolves the rows of dead workers left in ``sending``: an ambiguous outcome, never resent blindly.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence
from uuid import UUID, uuid4

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
    TlsFailed,
    TransientError,
)
from shared.events.envelope import utcnow
from shared.events.payloads import ActivityCreatedV1, EmailOutboundV1, EmailStatusV1, RegardingRef
from shared.events.topics import EMAIL_OUTBOUND
from shared.metrics import ACTIVITIES_CREATED, EMAILS_SENT, MAILBOX_FAILURES, SEND_LATENCY
from shared.rawstore import load_raw
from shared.registry.service import MailboxWork
from shared.runtime import ServiceBase
from shared.settings import Settings
from shared.tracking import make_tracking_token, subject_with_token, subject_without_token

from . import ledger
from .consuming import BatchingConsumer
from .compose import check_headers, check_size, compose, message_id_for
from .settings import DispatchSettings
from .smtp_client import SmtpOutcomeUnknown, SmtpPermanentFailure, SmtpTemporaryFailure
from .transports import Accepted, Transports, transport_name

log = logging.getLogger(__name__)

GROUP_ID = "conduit-dispatch"


class _UncheckedOutbound(BaseModel):
    """The payload as it arrived: validated by the handler, so a schema error can be announced."""

    model_config = ConfigDict(extra="allow")


UNCHECKED_OUTBOUND = dataclasses.replace(EMAIL_OUTBOUND, payload=_UncheckedOutbound)


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


def _refusal(state: asyncpg.Record | None) -> tuple[str, str] | None:
    """Why a mailbox may not send, in the order an administrator would fix it; None if it may."""
    if state is None:
        return "unknown_mailbox", "no such mailbox in the organization"
    if not state["active"]:
        return "mailbox_inactive", f"the mailbox {state['email']} is inactive"
    if state["profile_id"] is None:
        return "no_profile", f"the mailbox {state['email']} has no email server profile"
    if not state["email_approved"]:
        return "email_not_approved", f"the email address {state['email']} is not approved"
    if state["forward"]:
        return "forward_mailbox", "a forward mailbox receives email only"
    if not state["owner_active"]:
        return "owner_inactive", "the mailbox's user or queue is inactive"
    if state["owner_method"] != "server_side_sync":
        return "outgoing_not_enabled", "the owner's outgoing email is not delivered by server-side synchronization"
    if state["outgoing_status"] != "success":
        return "outgoing_not_enabled", "outgoing email is not enabled for this mailbox (run Test & Enable)"
    return None


def _mailbox_level(exc: BaseException) -> bool:
    """A failure of the mailbox or its server, not of this message: back off the mailbox."""
    if isinstance(exc, (AuthenticationFailed, TlsFailed)):
        return True
    return isinstance(exc, (ConnectionFailed, ProtocolTimeout)) and getattr(exc, "opening_session", False)


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
        self.counts = {"sent": 0, "failed": 0, "rejected": 0, "retried": 0, "outcome_unknown": 0}

    # -- lifecycle

    async def on_start(self) -> None:
        assert self.pool is not None
        # A connection held for the worker's life: its advisory lock says "this worker is alive".
        self._lock_conn = await self.pool.acquire()
        self.worker_id = await ledger.register_worker(self._lock_conn)
        self.transports = Transports(timeout=self.options.smtp_timeout_seconds, helo_name=self.options.helo_name)
        self.consumer = BatchingConsumer(self.settings, UNCHECKED_OUTBOUND, group_id=self.group_id, handler=self.handle,
                                      publisher=self.publisher, max_batch=self.options.batch_size)
        await self.consumer.start()
        log.info("dispatch worker %d started", self.worker_id)

    async def on_stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self.transports is not None:
            await self.transports.close()
        if self._lock_conn is not None and self.pool is not None:
            await self.pool.release(self._lock_conn)  # the reset releases the advisory lock
            self._lock_conn = None

    async def work(self, stopping: asyncio.Event, *, burst: bool) -> None:
        assert self.consumer is not None
        self._stopping = stopping
        if burst:
            await self.consumer.run(stopping, burst=True)
            await self._drain_retries(stopping)
            return
        retries = asyncio.create_task(self._retry_loop(stopping), name="dispatch-retries")
        try:
            await self.consumer.run(stopping)
        finally:
            stopping.set()
            await retries

    def status(self) -> dict[str, Any]:
        return {"service": self.name, "worker": self.worker_id, **self.counts}

    # -- the consumer handler

    async def handle(self, deliveries: Sequence[Delivery]) -> Sequence[Rejection]:
        assert self.pool is not None and self.registry is not None
        invalid: list[_Invalid] = []
        valid: list[tuple[Delivery, EmailOutboundV1]] = []
        seen: set[tuple[UUID, str]] = set()
        for delivery in deliveries:
            data = delivery.event.data.model_dump()
            key = data.get("idempotency_key") if isinstance(data.get("idempotency_key"), str) else None
            try:
                request = _validated(data)
                check_headers(request.headers)
                check_size(request, self.options.max_message_bytes)
            except InvalidInput as exc:
                invalid.append(_Invalid(delivery, exc, key if key and _printable(key) else None, data))
                continue
            natural_key = (delivery.event.organization_id, request.idempotency_key)
            if natural_key not in seen:  # the same key twice in a batch: the first one stands
                seen.add(natural_key)
                valid.append((delivery, request))

        senders = [(d.event.organization_id, r.mailbox_id, None if r.mailbox_id else r.sender_email) for d, r in valid]
        async with self.pool.acquire() as conn:
            distinct = list(dict.fromkeys(senders))
            found = dict(zip(distinct, await ledger.resolve_senders(conn, distinct)))
            mailbox_ids = {m for m in found.values() if m is not None}
            states = await ledger.mailbox_states(conn, mailbox_ids)
            orgs = await ledger.organizations(conn, {d.event.organization_id for d in deliveries})
            refs = {a.content_sha256 for _, r in valid for a in r.attachments if a.content_sha256}
            stored = await ledger.stored_content(conn, refs) if refs else set()
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

        claimed, waiting = await self._accept(accepted, invalid, orgs)
        await self._send_waves(claimed, waiting, eligible)
        self.counts["rejected"] += len(invalid)
        return [Rejection(i.delivery, i.error) for i in invalid]

    def _problem(self, delivery: Delivery, request: EmailOutboundV1, mailbox_id: UUID | None,
                 states: dict[UUID, asyncpg.Record], eligible: dict[UUID, MailboxWork],
                 orgs: dict[UUID, asyncpg.Record], stored: set[str]) -> InvalidInput | None:
        if delivery.event.organization_id not in orgs:
            return InvalidInput("no such organization", reason="unknown_organization")
        if mailbox_id is None:
            who = str(request.mailbox_id) if request.mailbox_id else request.sender_email
            return InvalidInput(f"no mailbox, user or queue {who} in the organization", reason="unknown_mailbox")
        if mailbox_id not in eligible:
            refusal = _refusal(states.get(mailbox_id))
            if refusal is not None:
                return InvalidInput(refusal[1], reason=refusal[0])
        for attachment in request.attachments:
            if attachment.content_sha256 and attachment.content_sha256 not in stored:
                return InvalidInput(f"attachment {attachment.filename!r} refers to content that is not stored",
                                    reason="attachment_not_found")
        return None

    async def _accept(self, accepted: list[tuple[Delivery, EmailOutboundV1, asyncpg.Record, datetime | None]],
                      invalid: list[_Invalid], orgs: dict[UUID, asyncpg.Record]) -> tuple[list[asyncpg.Record], list[UUID]]:
        """One transaction: ledger rows, rejections, the first wave claimed, and their status events."""
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
                request_id = uuid4()
                token = make_tracking_token(next(numbers), org["tracking_token_prefix"], org["tracking_token_digits"]) \
                    if token_wanted else None
                rows.append(ledger.NewRequest(
                    id=request_id, organization_id=delivery.event.organization_id,
                    idempotency_key=request.idempotency_key, mailbox_id=state["id"],
                    message_id=message_id_for(request_id, state["email"]),
                    subject=subject_with_token(request.subject, token) if token else request.subject,
                    tracking_token=token, next_attempt_at=postpone, deadline=request.deadline or default_deadline,
                    request=request.model_dump(mode="json", exclude_defaults=True), event_id=delivery.event.event_id,
                    correlation_id=delivery.event.correlation_id, requested_at=delivery.event.occurred_at,
                ))
            inserted = await ledger.insert_requests(conn, rows)
            for row in rows:
                if row.id in inserted:
                    events.append(ledger.status_event(row.organization_id, EmailStatusV1(
                        idempotency_key=row.idempotency_key, status="pending_send", request_id=row.id,
                        mailbox_id=row.mailbox_id, message_id=row.message_id,
                        reason="mailbox_backoff" if row.next_attempt_at else None,
                        detail="the mailbox is backing off after failures; sending when it ends" if row.next_attempt_at else None,
                    ), row.correlation_id))
            rejected = [i for i in invalid if i.key is not None]
            announce = await ledger.record_rejections(conn, [ledger.RejectedRequest(
                organization_id=i.delivery.event.organization_id, idempotency_key=i.key, mailbox_id=i.mailbox_id,  # type: ignore[arg-type]
                reason=i.error.reason, detail=i.error.message, request=i.data, event_id=i.delivery.event.event_id,
            ) for i in rejected])
            for item, yes in zip(rejected, announce):
                if yes:
                    events.append(ledger.status_event(item.delivery.event.organization_id, EmailStatusV1(
                        idempotency_key=item.key, status="rejected", mailbox_id=item.mailbox_id,  # type: ignore[arg-type]
                        reason=item.error.reason, detail=item.error.message[:1000],
                    ), item.delivery.event.correlation_id))
            due = [r.id for r in rows if r.id in inserted and r.next_attempt_at is None]
            first, waiting = due[: self.options.wave_size], due[self.options.wave_size:]
            claimed = await ledger.claim(conn, first, self.worker_id)
            events += [self._sending_event(r) for r in claimed]
            await ledger.enqueue_events(conn, events)
        return claimed, waiting

    # -- sending

    def _sending_event(self, row: asyncpg.Record) -> tuple[str, str, Any]:
        return ledger.status_event(row["organization_id"], EmailStatusV1(
            idempotency_key=row["idempotency_key"], status="sending", request_id=row["id"], mailbox_id=row["mailbox_id"],
            message_id=row["message_id"], attempt=row["attempts"]), row["correlation_id"])

    async def _send_waves(self, claimed: list[asyncpg.Record], waiting: list[UUID], works: dict[UUID, MailboxWork]) -> None:
        """Send the claimed wave; record its outcomes and claim the next in one transaction; repeat."""
        assert self.pool is not None and self.worker_id is not None
        backoff: dict[UUID, datetime] = {}
        while claimed:
            results = await self._send_wave(claimed, works, backoff)
            outcomes, events = await self._outcomes(results, backoff)
            # Stopping: leave the rest pending and due; whichever worker comes next sends them.
            next_ids = [] if self._stopping.is_set() else waiting[: self.options.wave_size]
            waiting = waiting[len(next_ids):]
            async with self.pool.acquire() as conn, conn.transaction():
                events = await self._write_outcomes(conn, results, outcomes, events)
                claimed = await ledger.claim(conn, next_ids, self.worker_id)
                events += [self._sending_event(r) for r in claimed]
                await ledger.enqueue_events(conn, events)
            await self._mailbox_recovered(results)

    async def _send_wave(self, rows: list[asyncpg.Record], works: dict[UUID, MailboxWork],
                         backoff: dict[UUID, datetime]) -> list[_Result]:
        assert self.pool is not None
        refs = {a["content_sha256"] for r in rows for a in r["request"].get("attachments", []) if a.get("content_sha256")}
        attachments: dict[str, bytes] = {}
        if refs:
            async with self.pool.acquire() as conn:
                attachments = await load_raw(conn, refs)
        return list(await asyncio.gather(*(self._send_one(row, works.get(row["mailbox_id"]), backoff, attachments)
                                           for row in rows)))

    async def _send_one(self, row: asyncpg.Record, work: MailboxWork | None, backoff: dict[UUID, datetime],
                        attachments: dict[str, bytes]) -> _Result:
        assert self.transports is not None
        result = _Result(row, work, transport_name(work) if work else None, None)
        try:
            result.request = EmailOutboundV1.model_validate(row["request"])
            if work is None:
                raise InvalidInput("the mailbox may no longer send", reason="mailbox_unavailable")
            if row["mailbox_id"] in backoff:  # an earlier wave of this batch backed the mailbox off
                result.postpone_until = backoff[row["mailbox_id"]]
                return result
            composed = compose(result.request, sender_email=work.email, sender_name=work["name"], subject=row["subject"],
                               message_id=row["message_id"], attachments=attachments, date=row["created_at"],
                               max_bytes=self.options.max_message_bytes, bcc_header=result.transport != "smtp")
            result.accepted = await self.transports.send(work, composed.raw, composed.recipients)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an outcome below
            result.error = exc
        return result

    async def _outcomes(self, results: list[_Result], backoff: dict[UUID, datetime]) -> tuple[list[ledger.Outcome], list[Any]]:
        """Turn results into ledger outcomes; mailbox-level failures back the mailbox off first."""
        assert self.registry is not None
        for result in results:
            exc, mailbox_id = result.error, result.row["mailbox_id"]
            if exc is not None and _mailbox_level(exc) and mailbox_id not in backoff:
                reason = getattr(exc, "reason", "error")
                MAILBOX_FAILURES.labels("outgoing", reason).inc()
                backoff[mailbox_id] = await self.registry.record_failure(
                    mailbox_id, "outgoing", reason, f"sending failed: {_message(exc)}")
        now = utcnow()
        outcomes: list[ledger.Outcome] = []
        for result in results:
            row, exc = result.row, result.error
            outcome = ledger.Outcome(row["id"], "failed", transport=result.transport)
            if result.accepted is not None:
                outcome.status = "sent"
                outcome.smtp_code, outcome.smtp_reply = result.accepted.code, result.accepted.reply
                if result.accepted.refused_recipients:
                    refused = ", ".join(f"{a} ({c} {t})" for a, (c, t) in list(result.accepted.refused_recipients.items())[:10])
                    outcome.detail = f"accepted, but the server refused {len(result.accepted.refused_recipients)} recipient(s): {refused}"
            elif result.postpone_until is not None:
                self._retry(outcome, row, now, "mailbox_backoff", "the mailbox is backing off after failures",
                            at=result.postpone_until)
            elif isinstance(exc, SmtpOutcomeUnknown):
                outcome.reason, outcome.detail = "outcome_unknown", (
                    f"{_message(exc)}; not resent, so that it cannot arrive twice (Message-ID <{row['message_id']}>)")
                self.counts["outcome_unknown"] += 1
            elif exc is not None and _mailbox_level(exc):
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
                              events: list[Any]) -> list[Any]:
        assert self.worker_id is not None
        activities: list[ledger.SentActivity] = []
        for result, outcome in zip(results, outcomes):
            if outcome.status == "sent" and result.request is not None and result.request.track and result.work is not None:
                activities.append(self._activity(result))
        ids = await ledger.insert_activities(conn, activities)
        by_message = {a.message_id: a for a in activities}
        for result, outcome in zip(results, outcomes):
            outcome.activity_id = ids.get(result.row["message_id"]) if outcome.status == "sent" else None
        written = await ledger.record_outcomes(conn, outcomes, self.worker_id)
        now = utcnow()
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
                EMAILS_SENT.labels("sent", outcome.transport or "smtp").inc()
                if row["requested_at"] is not None:
                    SEND_LATENCY.observe(max(0.0, (now - row["requested_at"]).total_seconds()))
                activity = by_message.get(row["message_id"])
                if activity is not None and outcome.activity_id == activity.id:
                    ACTIVITIES_CREATED.labels("outgoing").inc()
                    events.append(ledger.activity_event(row["organization_id"], ActivityCreatedV1(
                        activity_id=activity.id, message_id=activity.message_id, direction="outgoing", status="sent",
                        subject=activity.subject, from_address=activity.from_address, to_addresses=activity.to,
                        cc_addresses=activity.cc, mailbox_ids=[activity.mailbox_id],
                        regarding=RegardingRef(kind=activity.regarding_kind, id=activity.regarding_id)
                        if activity.regarding_id else None), row["correlation_id"]))
            elif outcome.status == "failed":
                self.counts["failed"] += 1
                EMAILS_SENT.labels("failed", outcome.transport or "none").inc()
            else:
                self.counts["retried"] += 1
        return events

    def _activity(self, result: _Result) -> ledger.SentActivity:
        row, request, work = result.row, result.request, result.work
        assert request is not None and work is not None
        references = request.headers.get("References") or next(
            (v for k, v in request.headers.items() if k.lower() == "references"), None)
        root = references.split()[0].strip("<>") if references else row["message_id"]
        token = row["tracking_token"]
        prefix = token.rstrip("0123456789") if token else ""
        digits = len(token) - len(prefix) if token else 0
        subject = row["subject"]
        normalized = subject_without_token(subject, prefix, digits) if token else " ".join(subject.split())
        return ledger.SentActivity(
            id=uuid4(), organization_id=row["organization_id"], mailbox_id=work.id, message_id=row["message_id"],
            subject=subject, normalized_subject=normalized.lower(), from_address=work.email, to=list(request.to),
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

    # -- retries and orphans

    async def _retry_loop(self, stopping: asyncio.Event) -> None:
        last_orphan_check = 0.0
        while not stopping.is_set():
            try:
                if time.monotonic() - last_orphan_check > self.options.poll_seconds * 5:
                    await self.recover_orphans()
                    last_orphan_check = time.monotonic()
                if await self.retry_due():
                    continue
            except (OSError, asyncpg.PostgresError, ConduitError) as exc:
                log.warning("retry pass failed, trying again shortly: %s", exc)
            try:
                await asyncio.wait_for(stopping.wait(), timeout=self.options.poll_seconds)
            except asyncio.TimeoutError:
                pass

    async def _drain_retries(self, stopping: asyncio.Event) -> None:
        """Burst mode: send what is due; wait for retries due within the burst horizon; then return."""
        assert self.pool is not None
        horizon = self.options.burst_horizon_seconds
        while not stopping.is_set():
            await self.recover_orphans()
            if await self.retry_due():
                continue
            async with self.pool.acquire() as conn:
                wait = await ledger.next_due_in(conn)
            if wait is None or wait > horizon:
                return
            try:
                await asyncio.wait_for(stopping.wait(), timeout=max(wait, 0.01))
            except asyncio.TimeoutError:
                pass

    async def retry_due(self) -> int:
        """Claim and send one wave of due pending requests; returns how many rows were handled."""
        assert self.pool is not None and self.registry is not None and self.worker_id is not None
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await ledger.lock_due(conn, self.options.wave_size)
            if not rows:
                return 0
            mailbox_ids = {r["mailbox_id"] for r in rows if r["mailbox_id"] is not None}
            works = {w.id: w for w in await self.registry.mailboxes_to_process("outgoing", mailbox_ids=list(mailbox_ids))} \
                if mailbox_ids else {}
            states = await ledger.mailbox_states(conn, mailbox_ids - set(works))
            now = utcnow()
            to_claim: list[UUID] = []
            postponed: list[tuple[UUID, datetime, str | None, str | None]] = []
            failed: list[ledger.Outcome] = []
            for row in rows:
                mailbox_id = row["mailbox_id"]
                if row["deadline"] is not None and row["deadline"] < now:
                    failed.append(ledger.Outcome(row["id"], "failed", reason="deadline_exceeded", detail=(
                        f"the deadline passed before it could be sent; last error ({row['reason']}): {row['detail']}"),
                        smtp_code=row["smtp_code"], smtp_reply=row["smtp_reply"]))
                elif mailbox_id in works:
                    to_claim.append(row["id"])
                else:
                    state = states.get(mailbox_id) if mailbox_id else None
                    refusal = _refusal(state)
                    if refusal is not None:
                        failed.append(ledger.Outcome(row["id"], "failed", reason=refusal[0], detail=refusal[1]))
                    elif state is not None and state["backed_off"]:
                        postponed.append((row["id"], state["outgoing_backoff_until"], "mailbox_backoff",
                                          "the mailbox is backing off after failures"))
                    else:
                        to_claim.append(row["id"])
            await ledger.postpone(conn, postponed)
            written = await ledger.record_outcomes(conn, failed, None, from_status="pending_send")
            by_id = {r["id"]: r for r in rows}
            events = [ledger.status_event(by_id[o.id]["organization_id"], EmailStatusV1(
                idempotency_key=by_id[o.id]["idempotency_key"], status="failed", request_id=o.id,
                mailbox_id=by_id[o.id]["mailbox_id"], reason=o.reason, detail=o.detail, smtp_code=o.smtp_code,
                smtp_reply=o.smtp_reply, message_id=by_id[o.id]["message_id"], attempt=by_id[o.id]["attempts"]),
                by_id[o.id]["correlation_id"]) for o in failed if o.id in written]
            self.counts["failed"] += len(events)
            claimed = await ledger.claim(conn, to_claim, self.worker_id)
            events += [self._sending_event(r) for r in claimed]
            await ledger.enqueue_events(conn, events)
        await self._send_waves(claimed, [], works)
        return len(rows)

    async def recover_orphans(self) -> int:
        """Resolve rows left in `sending` by dead workers: ambiguous, so failed, never resent blindly."""
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
        assert self.pool is not None
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await ledger.sending_of(conn, worker_id)
            outcomes = [ledger.Outcome(
                r["id"], "failed", reason="outcome_unknown",
                detail=("the dispatch worker stopped while the message was being sent; the server may have "
                        f"accepted it, so it is not resent (look for Message-ID <{r['message_id']}>)"),
            ) for r in rows]
            written = await ledger.record_outcomes(conn, outcomes, worker_id)
            events = [ledger.status_event(r["organization_id"], EmailStatusV1(
                idempotency_key=r["idempotency_key"], status="failed", request_id=r["id"], mailbox_id=r["mailbox_id"],
                reason="outcome_unknown", detail=o.detail, message_id=r["message_id"], attempt=r["attempts"]),
                r["correlation_id"]) for r, o in zip(rows, outcomes) if r["id"] in written]
            await ledger.enqueue_events(conn, events)
        if rows:
            log.warning("worker %d died with %d request(s) in flight: marked failed (outcome_unknown)", worker_id, len(rows))
            self.counts["outcome_unknown"] += len(rows)
        return len(rows)


def _validated(data: dict[str, Any]) -> EmailOutboundV1:
    try:
        return EmailOutboundV1.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'data'}: {e['msg']}" for e in exc.errors()[:5])
        injection = any("header injection" in str(e.get("msg", "")) for e in exc.errors())
        raise InvalidInput(f"the request does not match email.outbound v1: {problems}",
                           reason="header_injection" if injection else "schema_error") from exc


def _printable(text: str) -> bool:
    return 0 < len(text) <= 200 and not any(c in text for c in "\r\n\x00")


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, ConduitError) else str(exc) or type(exc).__name__
