"""evaluate: decides which received email matters, correlates it and records email activities.

One consumer batch of `email.received` is one unit of work: raw bytes loaded in one query, every
message parsed, the batch's lookup keys resolved with one query per kind, the rule chains run in
memory, and one transaction records the activities (one per Message-ID per organization), the
mailboxes they came through, every decision (tracked or not, with its rule and reason) and the
`activity.created` events (outbox).  Offsets are committed after that transaction, so a crash
replays the batch, and the natural keys make the replay a no-op.

A forward mailbox's message is evaluated for the user or queue that forwarded it; a forward that
carries messages as attachments becomes one item per attached message (at most
``MAX_FORWARDED_MESSAGES``) plus a decision of its own that names them.

A message whose mailbox may not process email for now is held, not decided (``held.py``): the same
transaction records the held decision and keeps the event, and ``release.py`` evaluates it again
through the same two steps once the mailbox may process email.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Awaitable, Sequence, TypeVar
from uuid import UUID

import asyncpg

from services.evaluate import held
from services.evaluate import repository as repo
from services.evaluate.chains import OPTION_RULES
from services.evaluate.context import MailboxContext
from services.evaluate.correlation import CorrelationSettings, find_tracking_token, normalize_subject
from services.evaluate.decision import BatchItem, Decision, evaluate_batch
from services.evaluate.health import start_health
from services.evaluate.lookups import keys_for
from services.evaluate.parsing import ForwardedMessages, ParsedEmail, forwarded_messages, parse_email
from services.evaluate.release import HeldMessageRelease
from services.evaluate.settings import EvaluateSettings
from shared.batching import by_size
from shared.consumer import Delivery, EventConsumer, Rejection
from shared.errors import InvalidInput
from shared.events.envelope import Envelope
from shared.events.payloads import ActivityCreatedV1, ActivityUpdatedV1, RegardingRef
from shared.events.topics import ACTIVITY_CREATED, ACTIVITY_UPDATED, EMAIL_RECEIVED
from shared.ids import id_texts
from shared.metrics import ACTIVITIES_CREATED, DECISIONS
from shared.mime import message_key
from shared.outbox import enqueue_batch
from shared.rawstore import load_raw
from shared.registry.models import is_inbox
from shared.runtime import ServiceBase
from shared.settings import Settings

log = logging.getLogger(__name__)

GROUP = EvaluateSettings.model_fields["group_id"].default  # the default group, for tools and benches

# Parametrised once: ``Envelope[...]`` looks its class up in pydantic's generic cache at every use.
ActivityCreatedEvent = Envelope[ActivityCreatedV1]
ActivityUpdatedEvent = Envelope[ActivityUpdatedV1]


@dataclass
class _Item:
    """One received message on its way through the batch."""

    delivery: Delivery
    mailbox_id: UUID          # the mailbox it is evaluated for (the forwarder's, for a forward mailbox)
    organization_id: UUID
    message_id: str
    raw_sha256: str
    parsed: ParsedEmail | None = None
    context: MailboxContext | None = None
    settings: CorrelationSettings | None = None
    decision: Decision | None = None
    # (reason, explanation) of a forward mailbox message decided without the chains: one that could
    # not be attributed, or a forward whose attached messages are evaluated instead of it.
    attribution: tuple[str, str] | None = None


@dataclass
class _Prepared:
    """A batch loaded and parsed, not yet decided.  ``released``: the (mailbox, Message-ID) pairs of
    held messages evaluated again, which do not wait behind their mailbox's held messages."""

    items: list[_Item]
    rejections: list[Rejection]
    mailboxes: dict
    raws: dict[str, bytes]
    released: frozenset[tuple[UUID, str]] = frozenset()
    # (mailbox, folder) -> the record a folder-level tracking rule maps that folder to.
    folder_rules: dict[tuple[UUID, str], tuple[str, str]] = field(default_factory=dict)


T = TypeVar("T")

# Messages parsed between two yields to the event loop while preparing (~6 ms of CPU).
_PARSE_SLICE = 50
# Activity ids, drawn in blocks (shared.ids): a uuid4() each cost ~4% of evaluate's CPU.
_ACTIVITY_IDS = id_texts()
# Attached messages evaluated per forward; the outer message's decision names the ones past it.
MAX_FORWARDED_MESSAGES = 20


class EvaluateService(ServiceBase):
    name = "evaluate"

    def __init__(self, settings: Settings, *, max_batch: int | None = None,
                 evaluate_settings: EvaluateSettings | None = None) -> None:
        super().__init__(settings)
        self.own = evaluate_settings or EvaluateSettings()
        self.max_batch = max_batch or self.own.max_batch
        self.consumer: EventConsumer | None = None
        self.release: HeldMessageRelease | None = None

    async def on_start(self) -> None:
        # One handler call per fetch across partitions: a batch's fixed cost (raw load, look-ups, one
        # transaction, the offset commit) is shared, and the handler groups by organization anyway.
        # fetch_max_wait_ms: the broker answers a fetch at once when a message arrives, instead of
        # holding it up to aiokafka's default 500 ms (bench/idle_latency.py: p50 384 -> 310 ms).
        self.consumer = EventConsumer(self.settings, EMAIL_RECEIVED, group_id=self.own.group_id, handler=self.handle,
                                      publisher=self.publisher, max_batch=self.max_batch,
                                      across_partitions=True, batch_window_ms=10, fetch_max_wait_ms=20,
                                      stages=(self.prepare, self.finish), service="evaluate")
        assert self.pool is not None
        self.release = HeldMessageRelease(self.pool, self.evaluate_again, batch=self.own.release_batch,
                                          interval=self.own.release_seconds, max_bytes=self.own.max_batch_bytes)
        await self.consumer.start()

    async def on_stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()

    async def work(self, stopping: asyncio.Event, *, burst: bool) -> None:
        assert self.consumer is not None and self.release is not None
        if burst:
            # Held messages first, so the backlog's newer mail does not wait behind them; and again at
            # the end, for mailboxes that may process email again since.
            await self.release.release()
            await self.consumer.run(stopping, burst=True)
            await self.release.release()
            return
        # The health aggregate (mailbox.health) is monitoring: it runs beside the consumer and never in
        # its way.  Its start waits on the broker and on its table's recovery, which may take long or
        # never end (a broker restarted without the changelog): mail is evaluated meanwhile.
        aggregate = asyncio.create_task(self._health_aggregate(stopping), name="evaluate-health") \
            if self.own.health_aggregate else None
        releasing = asyncio.create_task(self.release.run(stopping), name="evaluate-release")
        try:
            await self.consumer.run(stopping, burst=False)
        finally:
            if not stopping.is_set():
                releasing.cancel()  # the consumer failed: nothing to finish gracefully
                if aggregate is not None:
                    aggregate.cancel()
            await asyncio.gather(releasing, *([aggregate] if aggregate else []), return_exceptions=True)

    async def _health_aggregate(self, stopping: asyncio.Event) -> None:
        """Run the health aggregate until stopped.  A start that fails, or does not finish within
        ``health_start_seconds``, is logged and tried again later (with back-off)."""
        delay = 5.0
        while not stopping.is_set():
            try:
                # The state folder holds the aggregate's table (a pod's /tmp starts empty).
                self.settings.state_dir.mkdir(parents=True, exist_ok=True)
                health = await unless_stopping(
                    asyncio.wait_for(start_health(self.settings), self.own.health_start_seconds), stopping)
            except Exception as exc:  # noqa: BLE001 - monitoring: report, retry, never stop evaluating mail
                log.warning("the mailbox health aggregate did not start (%s: %s); mail is evaluated all the same; "
                            "trying again in %.0f s", type(exc).__name__, str(exc) or "no answer in time", delay)
                try:
                    await asyncio.wait_for(stopping.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 300.0)
                continue
            if health is None:
                return   # stopped while it started
            try:
                await stopping.wait()
            finally:
                await health.stop()
            return

    async def handle(self, deliveries: Sequence[Delivery]) -> Sequence[Rejection]:
        return await self.finish(await self.prepare(deliveries))

    async def prepare(self, deliveries: Sequence[Delivery]) -> _Prepared | _Parts:
        """Load and parse a batch: reads and CPU only, so it may run while the previous batch commits.
        A batch of more raw mail than ``max_batch_bytes`` is left in parts, each loaded as it is settled."""
        parts = by_size(deliveries, lambda d: d.event.data.size, self.own.max_batch_bytes)
        if len(parts) > 1:
            return _Parts(parts)
        return await self._load(deliveries)

    async def _load(self, deliveries: Sequence[Delivery]) -> _Prepared:
        assert self.pool is not None
        rejections: list[Rejection] = []
        async with self.pool.acquire() as conn:
            raws = await load_raw(conn, [d.event.data.raw_sha256 for d in deliveries])
            mailboxes = await repo.mailbox_rows(conn, [d.event.data.mailbox_id for d in deliveries])
            folder_rules = await repo.folder_regarding(conn, _mapped_folders(deliveries))
        items: list[_Item] = []
        for d in deliveries:
            data = d.event.data
            raw = raws.get(data.raw_sha256)
            mailbox = mailboxes.get(data.mailbox_id)
            if raw is None:
                rejections.append(Rejection(d, InvalidInput(f"raw message {data.raw_sha256} is not in the raw store", reason="raw_missing")))
                continue
            if mailbox is None or mailbox["organization_id"] != d.event.organization_id:
                rejections.append(Rejection(d, InvalidInput(f"unknown mailbox {data.mailbox_id}", reason="unknown_mailbox")))
                continue
            items.append(_Item(d, data.mailbox_id, mailbox["organization_id"], data.message_id or message_key(raw), data.raw_sha256))
        for start in range(0, len(items), _PARSE_SLICE):
            if start:
                await asyncio.sleep(0)  # let the previous batch's transaction move on between slices
            _parse_items(items[start:start + _PARSE_SLICE], raws)
        return _Prepared(items, rejections, mailboxes, raws, folder_rules=folder_rules)

    async def finish(self, prepared: _Prepared | _Parts) -> Sequence[Rejection]:
        """Attribute, decide and record a prepared batch in one transaction (a batch in parts: a
        part at a time, in order, so a part's reply finds the message a part before it answers)."""
        try:
            if isinstance(prepared, _Parts):
                rejections: list[Rejection] = []
                for part in prepared.parts:
                    rejections += (await self._settle(await self._load(part)))[0]
                return rejections
            rejections, _ = await self._settle(prepared)
            return rejections
        except asyncpg.DataError as exc:
            # PostgreSQL refused a value (SQLSTATE class 22: a NUL another producer put in a Message-ID):
            # every retry would fail the same way.  InvalidInput makes the consumer handle the batch
            # one event at a time, so the one that cannot be stored is dead-lettered and the others go on.
            raise InvalidInput(f"the message could not be stored: {exc}", reason="unstorable") from exc

    async def evaluate_again(self, deliveries: Sequence[Delivery], released: frozenset[tuple[UUID, str]]) -> int:
        """Held messages' events through the same two steps; how many held messages were decided for good."""
        prepared = await self._load(deliveries)   # release.py keeps a release batch within max_batch_bytes
        prepared.released = released
        rejections, decided = await self._settle(prepared)
        for rejection in rejections:
            # Cannot happen: a held message's raw and mailbox are kept by foreign keys.  It stays held.
            log.error("a held message of mailbox %s could not be evaluated again: %s",
                      rejection.delivery.event.data.mailbox_id, rejection.error.message)
        return decided

    async def _settle(self, prepared: _Prepared) -> tuple[Sequence[Rejection], int]:
        assert self.pool is not None
        mailboxes = prepared.mailboxes
        items = await self._attribute_forwarded(prepared.items, mailboxes, prepared.raws)
        by_org: dict[UUID, list[_Item]] = defaultdict(list)
        for item in items:
            by_org[item.organization_id].append(item)
        async with self.pool.acquire() as conn:
            # Read here, not while preparing: batches finish one at a time, so what the previous one
            # held is seen, and a mailbox's newer mail waits behind it.
            waiting = await held.holding(conn, [(i.mailbox_id, _forwarded(i)) for i in items])
            for org_id, org_items in by_org.items():
                await self._decide(conn, org_items, mailboxes, waiting, prepared.released, prepared.folder_rules)
            async with conn.transaction():
                decided, counts = await self._record(conn, items, waiting, prepared.released)
            # After the commit (a crash before the offset commit repeats it with the batch).
            linked = await repo.link_to_activities(
                conn, list({(i.organization_id, i.message_id) for i in items if i.decision and not i.decision.held}),
                OPTION_RULES)
            if linked:
                log.info("%d message(s) decided not tracked are already tracked: another batch made them "
                         "activities at the same moment", linked)
        counts.publish()  # once committed: a batch rolled back and redelivered is counted once
        return prepared.rejections, decided

    async def _attribute_forwarded(self, items: list[_Item], mailboxes: dict, raws: dict[str, bytes]) -> list[_Item]:
        """A forward mailbox's message belongs to the user or queue that forwarded it, if that user or
        queue uses the forward mailbox as its delivery method; never to anyone else.  An inactive
        one's message is attributed too, and held by its mailbox's guard until they are active again.

        Returns the batch to decide: a forward that carries messages as attachments is replaced by
        its own decision (``forwarded_messages_extracted``) followed by each attached message, in
        order, evaluated for the forwarder."""
        assert self.pool is not None
        forwarded = [i for i in items if mailboxes[i.mailbox_id]["owner_kind"] is None]
        if not forwarded:
            return items
        unpacked: dict[int, list[_Item]] = {}   # id(outer item) -> the attached messages to decide after it
        async with self.pool.acquire() as conn:
            for org_id in {i.organization_id for i in forwarded}:
                senders = [i.delivery.event.data.forwarded_by for i in forwarded if i.organization_id == org_id and i.delivery.event.data.forwarded_by]
                found = await repo.forwarders(conn, org_id, senders) if senders else {}
                extra = [f["mailbox_id"] for f in found.values() if f["mailbox_id"] and f["mailbox_id"] not in mailboxes]
                if extra:
                    mailboxes.update(await repo.mailbox_rows(conn, extra))
                for item in (i for i in forwarded if i.organization_id == org_id):
                    sender = (item.delivery.event.data.forwarded_by or "").lower()
                    who = found.get(sender)
                    if who is None or who["incoming_method"] != "forward_mailbox" or who["mailbox_id"] is None:
                        item.attribution = ("forwarder_unknown",
                            f"Not tracked: the forward mailbox received this from {sender or 'an unknown sender'}, "
                            "which is no user or queue whose incoming email is delivered through a forward mailbox.")
                        continue
                    attached = (forwarded_messages(raws[item.raw_sha256], limit=MAX_FORWARDED_MESSAGES)
                                if item.parsed is None or item.parsed.has_forwarded_message else ForwardedMessages())
                    if not attached.found:
                        item.mailbox_id = who["mailbox_id"]   # forwarded inline or redirected: the message itself
                        continue
                    inner = _unpack(item, attached, who["mailbox_id"])
                    item.attribution = _forward_explanation(item, sender, inner, attached)
                    unpacked[id(item)] = inner
        if not unpacked:
            return items
        out: list[_Item] = []
        for item in items:
            out.append(item)
            out.extend(unpacked.get(id(item), ()))
        return out

    async def _decide(self, conn, items: list[_Item], mailboxes: dict, waiting: set[tuple[UUID, bool]],
                      released: frozenset[tuple[UUID, str]],
                      folder_rules: dict[tuple[UUID, str], tuple[str, str]] | None = None) -> None:
        org_row = mailboxes[items[0].delivery.event.data.mailbox_id]
        settings = CorrelationSettings(
            order=tuple(org_row["correlation_order"]), tracking_token_enabled=org_row["tracking_token_enabled"],
            tracking_token_prefix=org_row["tracking_token_prefix"], tracking_token_digits=org_row["tracking_token_digits"],
            smart_matching=org_row["smart_matching"],
            smart_matching_min_shared_recipients=org_row["smart_matching_min_recipients"],
        )
        batch = []
        for item in items:
            item.settings = settings
            if item.attribution:
                continue
            assert item.parsed is not None
            # One identity everywhere: the Message-ID key ingest computed (or a hash when there is none).
            if item.parsed.message_id != item.message_id:  # equal for almost every message: no copy then
                item.parsed = replace(item.parsed, message_id=item.message_id)
            item.context = repo.mailbox_context(
                mailboxes[item.mailbox_id], forwarded=_forwarded(item),
                holds_messages=(item.mailbox_id, _forwarded(item)) in waiting
                and (item.mailbox_id, item.message_id) not in released)
            batch.append(item)
        lookups = await repo.load_lookups(conn, items[0].organization_id, keys_for([i.parsed for i in batch], settings),
                                          send_wait_seconds=self.own.send_wait_seconds)
        rules = folder_rules or {}
        decisions = evaluate_batch(
            [BatchItem(i.parsed, i.context, i.delivery.event.data.received_at,  # type: ignore[arg-type]
                       # A rule maps a folder of the mailbox that read the message; a message evaluated
                       # for the user who forwarded it was in no folder of theirs.
                       None if _forwarded(i) else rules.get((i.mailbox_id, i.delivery.event.data.folder)))
             for i in batch],
            lookups, settings, lambda _: next(_ACTIVITY_IDS),
        )
        for item, decision in zip(batch, decisions):
            item.decision = decision

    async def _record(self, conn, items: list[_Item], waiting: set[tuple[UUID, bool]],
                      released_keys: frozenset[tuple[UUID, str]] = frozenset()) -> tuple[int, _Counts]:
        """Record the batch; return how many held messages it decided for good, and what to count once
        it is committed.  ``released_keys``: the held messages this batch evaluates again
        (``evaluate_again``)."""
        activities: dict[tuple[UUID, str], repo.ActivityRow] = {}
        made_from: dict[UUID, _Item] = {}   # each new activity's message: its event's Bcc and times
        for item in items:
            d = item.decision
            if d is None or not d.creates_activity or (item.organization_id, item.message_id) in activities:
                continue
            p = item.parsed
            assert p is not None and item.settings is not None
            regarding_kind, regarding_id = d.regarding or (None, None)
            new = activities[(item.organization_id, item.message_id)] = repo.ActivityRow(
                id=UUID(d.activity_id), organization_id=item.organization_id, message_id=item.message_id,
                direction=d.direction, subject=p.subject, normalized_subject=normalize_subject(p.subject, item.settings),
                from_address=p.from_.email if p.from_ else None, to_addresses=[a.email for a in p.to],
                cc_addresses=[a.email for a in p.cc], parties=_parties(d), regarding_kind=regarding_kind,
                regarding_id=_uuid(regarding_id), tracking_token=find_tracking_token(p.subject, item.settings),
                thread_root=p.thread_root, correlated_by=d.correlation.method if d.correlation else None,
                raw_sha256=item.raw_sha256, preview=p.preview,
                regarding_at=item.delivery.event.occurred_at if d.rule == "folder_tracking" else None,
                correlated_activity_id=UUID(d.correlation.ref.activity_id) if d.correlation else None,
            )
            made_from[new.id] = item
        ids, created = await repo.insert_activities(conn, list(activities.values()))
        links, decisions, decision_activities = [], [], []
        holding: list[held.HeldMessage] = []
        settled: list[tuple[UUID, str]] = []   # decided for good, in a mailbox with held messages
        refiling: list[tuple[UUID, str, UUID, datetime]] = []   # (activity, kind, record, event time): folder rules
        filed_from: dict[UUID, _Item] = {}
        counts = _Counts()
        for item in items:
            d = item.decision
            activity_id = ids.get((item.organization_id, item.message_id)) if d and d.tracked else None
            if d is not None and d.tracked and activity_id is None and d.activity_id:
                activity_id = UUID(d.activity_id)  # already tracked before this batch
            if activity_id is not None:
                links.append((activity_id, item.mailbox_id))
                if d is not None and d.rule == "folder_tracking" and d.regarding:
                    # Already an activity, or made one by another replica a moment ago: the
                    # folder's record wins over whatever it regarded (the reference's rule).
                    at = item.delivery.event.occurred_at
                    refiling.append((activity_id, d.regarding[0], UUID(d.regarding[1]), at))
                    if activity_id not in filed_from or at > filed_from[activity_id].delivery.event.occurred_at:
                        filed_from[activity_id] = item   # the filing set_regarding keeps: the newest, first on ties
            tracked, rule, reason, explanation = (
                (d.tracked, d.rule, d.reason, d.explanation) if d is not None
                else (False, "forward_attribution", *item.attribution)  # type: ignore[misc]
            )
            on_hold = d is not None and d.held
            decisions.append(repo.DecisionRow(item.organization_id, item.mailbox_id, item.message_id, tracked, rule, reason,
                                              explanation, item.parsed.subject if item.parsed else "",
                                              item.parsed.from_.email if item.parsed and item.parsed.from_ else None,
                                              held=on_hold, event_at=item.delivery.event.occurred_at))
            decision_activities.append(activity_id)
            if on_hold:
                event = item.delivery.event
                holding.append(held.HeldMessage(
                    item.organization_id, item.mailbox_id, item.message_id,
                    forwarded=item.mailbox_id != event.data.mailbox_id, raw_sha256=item.raw_sha256,
                    event=event.model_dump(mode="json")))
            elif (item.mailbox_id, _forwarded(item)) in waiting:
                settled.append((item.mailbox_id, item.message_id))
            if not released_keys or (item.mailbox_id, item.message_id) in released_keys:
                # Evaluated again, a forward's own decision (and any message it carries that was not
                # held) is recorded again, unchanged: it was counted the first time.
                counts.decisions[("held" if on_hold else str(tracked).lower(), reason)] += 1
        await repo.link_mailboxes(conn, links)
        await repo.record_decisions(conn, decisions, decision_activities)
        await held.hold(conn, holding)
        released = await held.let_go(conn, settled)
        # Held for a mailbox, and evaluated again for another one (the forwarder it was attributed to
        # changed) or for none (it could not be read again): no decision of its own replaces the
        # held one, which would otherwise stay held for ever, and be tried again at every look.
        evaluated = {(item.mailbox_id, item.message_id) for item in items}
        released += await held.decide_orphans(conn, [k for k in released_keys if k not in evaluated])
        mailboxes_of: dict[UUID, list[UUID]] = defaultdict(list)
        for activity_id, mailbox_id in links:
            mailboxes_of[activity_id].append(mailbox_id)
        events = []
        for row in activities.values():
            if row.id not in created:
                continue
            item = made_from[row.id]
            p = item.parsed
            assert p is not None
            # The times as the rules saw them (EvaluationContext.received_at): the server's, else the
            # Date header; of mail the mailbox sent, the Date header is when it was sent (a copy's
            # server time is when the client filed it, or when a migration copied it in).
            server_time = item.delivery.event.data.received_at
            event = ActivityCreatedEvent(
                type=ACTIVITY_CREATED.name, schema_version=1, producer="evaluate", organization_id=row.organization_id,
                data=ActivityCreatedV1(
                    activity_id=row.id, message_id=row.message_id, direction=row.direction,
                    status="sent" if row.direction == "outgoing" else "received", subject=row.subject,
                    from_address=row.from_address, to_addresses=row.to_addresses, cc_addresses=row.cc_addresses,
                    mailbox_ids=mailboxes_of[row.id],
                    regarding=RegardingRef(kind=row.regarding_kind, id=row.regarding_id) if row.regarding_kind and row.regarding_id else None,
                    correlated_by=row.correlated_by, raw_sha256=row.raw_sha256,
                    correlated_activity_id=row.correlated_activity_id, bcc_addresses=[a.email for a in p.bcc],
                    tracking_token=row.tracking_token,
                    received_at=(server_time or p.date) if row.direction == "incoming" else None,
                    sent_at=(p.date or server_time) if row.direction == "outgoing" else None,
                ),
            )
            # Serialised here by pydantic (fast): one outbox row for the batch's events.
            events.append((ACTIVITY_CREATED.name, str(row.organization_id), event.model_dump_json()))
            counts.activities[row.direction] += 1
        for change in await repo.set_regarding(conn, refiling):
            item = filed_from[change.activity_id]
            update = ActivityUpdatedEvent(
                type=ACTIVITY_UPDATED.name, schema_version=1, producer="evaluate", organization_id=change.organization_id,
                data=ActivityUpdatedV1(
                    activity_id=change.activity_id, message_id=change.message_id,
                    regarding=RegardingRef(kind=change.regarding[0], id=change.regarding[1]),
                    previous_regarding=RegardingRef(kind=change.previous[0], id=change.previous[1]) if change.previous else None,
                    reason="folder_tracking_rule", mailbox_id=item.mailbox_id, folder=item.delivery.event.data.folder,
                ),
            )
            events.append((ACTIVITY_UPDATED.name, str(change.organization_id), update.model_dump_json()))
        await enqueue_batch(conn, events)
        return released, counts


@dataclass(frozen=True, slots=True)
class _Parts:
    """A batch of more raw mail than evaluate holds at once, settled a part at a time."""

    parts: list[list[Delivery]]


@dataclass(slots=True)
class _Counts:
    """A batch's decisions and created activities, counted in the metrics once its transaction commits."""

    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)
    activities: Counter[str] = field(default_factory=Counter)

    def publish(self) -> None:
        for labels, count in self.decisions.items():
            DECISIONS.labels(*labels).inc(count)
        for direction, count in self.activities.items():
            ACTIVITIES_CREATED.labels(direction).inc(count)


async def unless_stopping(starting: Awaitable[T], stopping: asyncio.Event, *, unwind_seconds: float = 5.0) -> T | None:
    """``starting``'s result, or None once ``stopping`` is set first: then it is cancelled and given
    ``unwind_seconds`` to undo what it began.  The health aggregate's start waits on the broker for
    as long as the broker does not answer; a SIGTERM in that window (a stack stopped as it starts,
    or whose broker died with it) must stop evaluate, not wait behind it."""
    started = asyncio.ensure_future(starting)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({started, stop}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # Cancelled itself (the consumer failed): the start must not go on alone and leave a
        # running aggregate that nothing stops.
        started.cancel()
        await asyncio.wait({started}, timeout=unwind_seconds)
        raise
    finally:
        stop.cancel()
    if started.done():
        return started.result()
    started.cancel()
    await asyncio.wait({started}, timeout=unwind_seconds)
    return None


def _forwarded(item: _Item) -> bool:
    """Evaluated for the user or queue that forwarded it, not for the mailbox that received it."""
    return item.mailbox_id != item.delivery.event.data.mailbox_id


def _mapped_folders(deliveries: Sequence[Delivery]) -> list[tuple[UUID, str]]:
    """The (mailbox, folder) pairs of a batch a folder-level tracking rule could map.  The Inbox
    never is (the registry refuses it), so a batch read from Inboxes alone costs no query."""
    return list({(d.event.data.mailbox_id, d.event.data.folder) for d in deliveries if not is_inbox(d.event.data.folder)})


def _parse_items(items: list[_Item], raws: dict[str, bytes]) -> None:
    for item in items:
        item.parsed = parse_email(raws[item.raw_sha256])


def _unpack(outer: _Item, attached: ForwardedMessages, mailbox_id: UUID) -> list[_Item]:
    """The forward's attached messages as items of their own, for the forwarder's mailbox: one per
    Message-ID (a message attached twice is evaluated once).  Their raw is the forward's: they are
    stored inside it."""
    inner: dict[str, _Item] = {}
    for raw in attached.messages:
        key = message_key(raw)
        if key not in inner:
            inner[key] = _Item(outer.delivery, mailbox_id, outer.organization_id, key, outer.raw_sha256,
                               parsed=parse_email(raw))
    return list(inner.values())


def _forward_explanation(outer: _Item, sender: str, inner: list[_Item], attached: ForwardedMessages) -> tuple[str, str]:
    """The forward's own decision: (reason, explanation) naming the messages evaluated in its place,
    and any it carried that were not."""
    ids = ", ".join(f"<{i.message_id}>" for i in inner)
    text = (f"Not tracked itself: {sender} forwarded {len(inner)} message(s) as attachments, "
            f"each evaluated on its own for {sender}'s mailbox: {ids}.")
    if not attached.omitted and not attached.parts_truncated:
        return "forwarded_messages_extracted", text
    if attached.omitted:
        skipped = ", ".join(f"<{message_key(raw)}>" for raw in attached.omitted)
        text += (f" {len(attached.omitted)} more attached message(s) were not evaluated (at most "
                 f"{MAX_FORWARDED_MESSAGES} per forward): {skipped}.")
    if attached.parts_truncated:
        text += " The forward has more MIME parts than are read; attached messages past them were not seen."
    log.warning("mailbox %s: forward <%s> carries more attached messages than are evaluated (%d evaluated, %d past "
                "the limit of %d%s)", outer.delivery.event.data.mailbox_id, outer.message_id, len(attached.messages),
                len(attached.omitted), MAX_FORWARDED_MESSAGES, ", MIME parts truncated" if attached.parts_truncated else "")
    return "forwarded_messages_over_limit", text


def _parties(d: Decision) -> list[dict]:
    out = []
    for role, matches in (("from", (d.parties.from_,) if d.parties.from_ else ()), ("to", d.parties.to), ("cc", d.parties.cc)):
        for m in matches:
            out.append({"role": role, "email": m.address.email,
                        "records": [{"kind": p.kind, "id": p.id} for p in m.parties]})
    return out


def _uuid(value: str | None) -> UUID | None:
    try:
        return UUID(value) if value else None
    except ValueError:
        return None
