"""The one way Conduit consumes a topic: decode, handle, dead-letter, then commit.

Committing the offset is the last step, by construction: a batch's offsets are committed only
after the handler returned (its effect is durable: database transaction committed, produced events
acknowledged) and every rejected event is acknowledged on the dead-letter topic.  A crash anywhere
before that replays the batch, which is why every handler is idempotent.  So does a group
rebalance during a batch (a replica joins or leaves): the offsets of partitions the consumer lost
are not committed, and their new owner handles those events again; the consumer carries on.

Two failure kinds, as in Sentry's Arroyo:
- ``InvalidInput`` for one event (undecodable, or the handler rejects it): dead-lettered with the
  original topic, partition, offset and reason in headers; a per-minute limit stops a bad deploy
  from draining a whole topic into the dead-letter topic.  A handler's ``Refused`` (a request it
  understood and refused by a rule) is dead-lettered too, but not counted toward that limit.
- ``TransientError``, or a failure of Conduit's own database or broker: the batch is retried with
  capped exponential back-off and jitter, without committing; the consumer holds its position
  meanwhile, for as long as the failure lasts.
- Any other exception is a bug that some input meets (Python's address parser recursing on a
  thousand nested comments), and a retry does not mend it: after ``_ATTEMPTS_BEFORE_ISOLATING``
  attempts the batch is handled one event at a time, and an event that still fails so is
  dead-lettered as ``internal_error`` (counted toward the limit; replayable once the bug is mended),
  so one event never holds its partitions, and every request batched with it, for ever.

By default the handler gets one partition's records at a time.  ``across_partitions=True`` gathers
what the fetches returned across every assigned partition (topping up for ``batch_window_ms``, up to
``max_batch``) into one handler call and commits all those partitions' offsets together, after the
handler returned and the rejections were dead-lettered: the same contract, larger batches, for a
handler with a fixed cost per call worth sharing (dispatch).  ``fetch_max_wait_ms`` asks the broker
to answer fetches sooner (latency at low rates).

``stages=(prepare, finish)`` (with ``across_partitions``) gives the handler in two steps,
``handler(batch)`` being ``finish(await prepare(batch))``, where ``prepare`` has no effect (reads
and CPU work only).  The next batch is then prepared while the previous one finishes (its
transaction waits on the database) and commits: one process keeps its CPU and the database busy at
once.  Batches still finish and commit one at a time, in order; a failed ``prepare`` only means the
batch is handled whole.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, RebalanceInProgressError

from shared.deadletters import REPLAYED_FROM, Headers, header_pairs, meant_for_another
from shared.errors import ConduitError, InvalidInput
from shared.events.envelope import Envelope, decode_event
from shared.events.topics import Topic, dead_letter
from shared.kafka import TOO_LARGE, Publisher, client_options, topic_name
from shared.metrics import EVENTS_CONSUMED, EVENTS_DEAD_LETTERED
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One decoded event and where it came from."""

    event: Envelope[Any]
    record: ConsumerRecord


@dataclass(frozen=True, slots=True)
class Rejection:
    """A delivery the handler refuses as invalid input; it goes to the dead-letter topic."""

    delivery: Delivery
    error: InvalidInput


Handler = Callable[[Sequence[Delivery]], Awaitable[Sequence[Rejection]]]
Stages = tuple[Callable[[Sequence[Delivery]], Awaitable[Any]], Callable[[Any], Awaitable[Sequence[Rejection]]]]
_UNPREPARED = object()
# What a retry may mend: Conduit's own failures and those of its database and broker.  Anything else
# a handler raises is a bug met by its input (see the module's docstring).
_RETRIABLE = (ConduitError, OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, KafkaError)
_ATTEMPTS_BEFORE_ISOLATING = 3
# A commit the broker has not confirmed in this long is given up on (``EventConsumer._commit``); a
# healthy one takes milliseconds.
COMMIT_TIMEOUT = 5.0


class DeadLetterLimitExceeded(RuntimeError):
    """More events were dead-lettered in a minute than allowed: stop rather than drain the topic."""


class DeadLetterGate:
    """What every consumer that dead-letters shares: the per-minute limit and the headers that say
    where an event came from and why it was refused."""

    def __init__(self, limit_per_minute: int, group: str) -> None:
        self._limit = limit_per_minute
        self._group = group
        self._window: list[float] = []

    def admit(self, source: str, error: InvalidInput) -> None:
        """Count one more dead letter, unless ``error`` does not count toward the limit (``Refused``);
        raise ``DeadLetterLimitExceeded`` past the limit."""
        if not error.counts_toward_limit:
            return
        now = time.monotonic()
        self._window = [t for t in self._window if now - t < 60] + [now]
        if len(self._window) > self._limit:
            raise DeadLetterLimitExceeded(
                f"more than {self._limit} events dead-lettered in a minute on {source}; "
                "stopping so a bad deploy cannot drain the topic"
            )

    def headers(self, topic: str, partition: int, offset: int, error: InvalidInput,
                original: Headers = None) -> list[tuple[str, bytes]]:
        log.warning("dead-lettering %s[%d]@%d: %s", topic, partition, offset, error.message)
        # A replayed event refused again says which dead letter it was (``shared.deadletters``).
        carried = [(name, value) for name, value in header_pairs(original) if name == REPLAYED_FROM]
        return carried + [
            ("original_topic", topic.encode()),
            ("original_partition", str(partition).encode()),
            ("original_offset", str(offset).encode()),
            ("reason", error.reason.encode()),
            ("error", error.message[:1000].encode()),
            ("consumer_group", self._group.encode()),
        ]


class EventConsumer:
    """Consumes one topic in a consumer group and hands batches to a handler."""

    def __init__(
        self,
        settings: Settings,
        topic: Topic,
        *,
        group_id: str,
        handler: Handler,
        publisher: Publisher,
        max_batch: int = 500,
        max_backoff: float = 30.0,
        across_partitions: bool = False,
        batch_window_ms: int = 0,
        fetch_max_wait_ms: int | None = None,
        stages: Stages | None = None,
        service: str = "conduit",
    ) -> None:
        if stages is not None and not across_partitions:
            raise ValueError("stages need across_partitions")
        self._settings = settings
        self._topic = topic
        self._group_id = group_id
        self._handler = handler
        self._publisher = publisher
        self._max_batch = max_batch
        self._max_backoff = max_backoff
        self._across_partitions = across_partitions
        self._batch_window_ms = batch_window_ms
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._stages = stages
        self._service = service   # the metrics' label
        self._consumer: AIOKafkaConsumer | None = None
        self._dead_letters = DeadLetterGate(settings.dlq_limit_per_minute, group_id)
        self.processed = 0
        self.dead_lettered = 0
        self._burst = False

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            topic_name(self._settings, self._topic.name),
            **client_options(self._settings),
            group_id=self._group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=16 * 1024 * 1024,
            **({"fetch_max_wait_ms": self._fetch_max_wait_ms} if self._fetch_max_wait_ms is not None else {}),
            # Short group timings: Tansu waits for the rebalance timeout on the first join.
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            rebalance_timeout_ms=5_000,
        )
        await self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("consumer not started")
        return self._consumer

    async def run(self, stopping: asyncio.Event, *, burst: bool = False) -> None:
        """Consume until ``stopping`` is set; in burst mode, also return once caught up."""
        self._burst = burst
        if self._stages is not None:
            await self._run_overlapped(stopping)
            return
        while not stopping.is_set():
            batches = await self.consumer.getmany(timeout_ms=200, max_records=self._max_batch)
            if not batches:
                if burst and await self._caught_up():
                    return
                continue
            if self._across_partitions:
                await self._top_up(batches)
                await self._process(batches, stopping)
                continue
            for tp, records in batches.items():
                if stopping.is_set():
                    break  # uncommitted: the partition's next owner replays it
                await self._process({tp: records}, stopping)

    async def _run_overlapped(self, stopping: asyncio.Event) -> None:
        """``run`` with ``stages``: prepare the next batch while the previous one finishes and commits."""
        prepare = self._stages[0]  # type: ignore[index]
        finishing: asyncio.Future[None] | None = None
        try:
            while not stopping.is_set():
                batches = await self.consumer.getmany(timeout_ms=200, max_records=self._max_batch)
                if not batches:
                    if finishing is not None and finishing.done():
                        finishing, done = None, finishing
                        done.result()  # raises what the batch raised
                    if finishing is None and self._burst and await self._caught_up():
                        return
                    continue
                await self._top_up(batches)
                decoded = self._decode(batches)
                prepared: Any = _UNPREPARED
                if decoded[0]:
                    try:
                        prepared = await prepare(decoded[0])
                    except Exception as exc:  # noqa: BLE001 - handled whole below, with its retries
                        log.debug("preparing a batch failed, it is handled whole: %s", exc)
                if finishing is not None:
                    await finishing
                finishing = asyncio.ensure_future(self._process(batches, stopping, decoded, prepared))
            if finishing is not None:
                await finishing
        except BaseException:
            if finishing is not None and not finishing.done():
                finishing.cancel()
            raise

    async def _top_up(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """Fetch more for up to ``batch_window_ms``, up to ``max_batch``: a fetch brings one small record
        batch per partition, and a handler with a fixed cost per call is worth a few milliseconds."""
        count = sum(len(r) for r in batches.values())
        window_ends = time.monotonic() + self._batch_window_ms / 1000
        while count < self._max_batch and time.monotonic() < window_ends:
            more = await self.consumer.getmany(timeout_ms=2, max_records=self._max_batch - count)
            for tp, records in more.items():
                batches.setdefault(tp, []).extend(records)
                count += len(records)

    async def _caught_up(self) -> bool:
        assignment = self.consumer.assignment()
        if not assignment:
            return False
        ends = await self.consumer.end_offsets(list(assignment))
        for tp in assignment:
            if await self.consumer.position(tp) < ends[tp]:
                return False
        return True

    def _decode(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> tuple[list[Delivery], list[Rejection]]:
        deliveries: list[Delivery] = []
        rejections: list[Rejection] = []
        envelope = self._topic.envelope  # (a parametrised model: looked up once, not per event)
        for records in batches.values():
            for record in records:
                if meant_for_another(record.headers, self._group_id):
                    continue   # a replay for the group that refused it; this one handled the original
                try:
                    deliveries.append(Delivery(decode_event(record.value, envelope), record))
                except InvalidInput as exc:
                    rejections.append(Rejection(Delivery(None, record), exc))  # type: ignore[arg-type]
        return deliveries, rejections

    async def _process(self, batches: dict[TopicPartition, list[ConsumerRecord]], stopping: asyncio.Event,
                       decoded: tuple[list[Delivery], list[Rejection]] | None = None, prepared: Any = _UNPREPARED) -> None:
        """Decode, handle (retrying transient failures), dead-letter the rejections, then commit."""
        where = ", ".join(str(tp) for tp in batches)
        deliveries, rejections = decoded or self._decode(batches)
        attempt = unexpected = 0
        one_by_one = False
        while True:
            try:
                if one_by_one:
                    rejections += await self._handle_one_by_one(deliveries)
                elif prepared is not _UNPREPARED:
                    # Only the first attempt: a retry prepares afresh, inside the handler.
                    ready, prepared = prepared, _UNPREPARED
                    rejections += list(await self._stages[1](ready))  # type: ignore[index]
                else:
                    rejections += list(await self._handler(deliveries)) if deliveries else []
                break
            except InvalidInput:
                # The handler could not say which event was wrong: handle them one by one (in this
                # loop, so a transient failure on the way is retried like any other).
                one_by_one = True
            except Exception as exc:  # noqa: BLE001 - transient or unexpected: retry, never skip
                if stopping.is_set():
                    log.warning("stopping with a failed batch left uncommitted on %s: %s", where, exc)
                    return
                attempt += 1
                if not isinstance(exc, _RETRIABLE):
                    unexpected += 1   # counted apart: a long database outage before it is no reason
                    if unexpected >= _ATTEMPTS_BEFORE_ISOLATING and not one_by_one:
                        log.error("batch on %s failed %d times with an unexpected %s: handling its events one by "
                                  "one to set aside the one that causes it", where, unexpected, type(exc).__name__,
                                  exc_info=exc)
                        one_by_one = True
                        continue
                if self._burst and attempt > 3:
                    raise  # a one-shot run reports the failure instead of retrying for ever
                await self._pause(attempt, stopping, f"batch on {where} failed", exc)
        for rejection in rejections:
            self._dead_letters.admit(self._topic.name, rejection.error)
        if not await self._dead_letter_all(rejections, stopping, where):
            return
        await self._commit({tp: records[-1].offset + 1 for tp, records in batches.items()}, where)
        count = sum(len(records) for records in batches.values())
        self.processed += count
        EVENTS_CONSUMED.labels(self._service, self._topic.name).inc(count)

    async def _commit(self, offsets: dict[TopicPartition, int], where: str) -> None:
        """Commit a handled batch's offsets, of the partitions this consumer still owns.  The group
        may have rebalanced while the batch was handled (another replica joined or left): the
        partitions it lost go to their new owner uncommitted, which handles those events again
        (every consumer is idempotent); that is no reason to stop.

        Bounded: aiokafka retries a commit the coordinator answers with a retriable error for ever (a
        broker that came back without the topic answers so), silently, and the consumer would handle
        nothing more and never stop.  A commit given up on leaves the batch to be handled again, as a
        rebalance does."""
        owned = self.consumer.assignment()
        kept = {tp: offset for tp, offset in offsets.items() if tp in owned}
        try:
            if kept:
                committing = asyncio.ensure_future(self.consumer.commit(kept))
                await asyncio.wait((committing,), timeout=COMMIT_TIMEOUT)
                if not committing.done():
                    committing.cancel()
                    log.warning("offsets of a batch on %s not committed: the broker did not confirm in %g s; the "
                                "batch is handled again after a restart or rebalance", where, COMMIT_TIMEOUT)
                    return
                committing.result()
        except (CommitFailedError, IllegalStateError, RebalanceInProgressError) as exc:
            log.info("offsets of a batch on %s not committed (%s: %s): the group rebalanced, and the "
                     "partitions' new owner handles the batch again", where, type(exc).__name__, exc)
            return
        if len(kept) < len(offsets):
            log.info("a batch on %s was handled while the group rebalanced: its events of partitions now "
                     "owned by another replica are handled there again", where)

    async def _handle_one_by_one(self, deliveries: list[Delivery]) -> list[Rejection]:
        rejected: list[Rejection] = []
        for delivery in deliveries:
            try:
                rejected += list(await self._handler([delivery]))
            except InvalidInput as exc:
                rejected.append(Rejection(delivery, exc))
            except _RETRIABLE:
                raise   # the whole pass is retried: the events handled before this one are no-ops then
            except Exception as exc:  # noqa: BLE001 - a bug this event meets: set it aside, go on
                record = delivery.record
                log.error("event at %s:%d@%d fails with an unexpected %s: dead-lettered as internal_error (replay "
                          "it once the cause is mended)", record.topic, record.partition, record.offset,
                          type(exc).__name__, exc_info=exc)
                rejected.append(Rejection(delivery, InvalidInput(
                    f"handling it failed with an unexpected {type(exc).__name__}: {str(exc)[:200]}",
                    reason="internal_error")))
        return rejected

    async def _pause(self, attempt: int, stopping: asyncio.Event, what: str, exc: BaseException) -> None:
        """Capped exponential back-off with jitter before another attempt, cut short by a stop."""
        delay = min(self._max_backoff, 0.2 * 2**attempt) * random.uniform(0.5, 1.0)
        log.warning("%s (attempt %d), retrying in %.1fs: %s", what, attempt, delay, exc)
        try:
            await asyncio.wait_for(stopping.wait(), timeout=delay)
        except asyncio.TimeoutError:
            pass

    async def _dead_letter_all(self, rejections: list[Rejection], stopping: asyncio.Event, where: str) -> bool:
        """Dead-letter a handled batch's rejections, waiting out a broker that is away as a handler's
        failure is waited out (the producer gives up on a message after its request timeout, and an
        error here would end the consumer).  False when stopping first: the batch stays uncommitted,
        handled again at the next start (a rejection dead-lettered twice is the worst of it)."""
        for rejection in rejections:
            attempt = 0
            while True:
                try:
                    await self._dead_letter(rejection)
                    break
                except KafkaError as exc:
                    if stopping.is_set():
                        log.warning("stopping with a batch on %s left uncommitted: its dead letters could not "
                                    "be published (%s)", where, exc)
                        return False
                    attempt += 1
                    if self._burst and attempt > 3:
                        raise
                    await self._pause(attempt, stopping, f"dead-lettering an event of {where} failed", exc)
        return True

    async def _dead_letter(self, rejection: Rejection) -> None:
        record = rejection.delivery.record
        headers = self._dead_letters.headers(record.topic, record.partition, record.offset, rejection.error,
                                             record.headers)
        key = (record.key or b"").decode(errors="replace")
        try:
            await self._publisher.publish_raw(dead_letter(self._topic.name), record.value or b"", key, headers)
        except TOO_LARGE:
            # More than the producer or the dead-letter topic takes (a source topic that allows more):
            # raised here, outside the retries, it would stop the consumer at the same event at every
            # start.  The event stays on its topic, where the headers say, for its retention.
            size = len(record.value or b"")
            log.error("event at %s:%d@%d (%d bytes) is too large for the dead-letter topic: dead-lettered without "
                      "its content, which stays on its own topic", record.topic, record.partition, record.offset, size)
            await self._publisher.publish_raw(dead_letter(self._topic.name), b"", key,
                                              headers + [("too_large", str(size).encode())])
        self.dead_lettered += 1
        EVENTS_DEAD_LETTERED.labels(self._service, self._topic.name, rejection.error.reason).inc()
