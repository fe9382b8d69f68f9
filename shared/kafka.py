"""Kafka clients: where the broker is, topic creation, and the event publisher.

Where the broker is: ``KAFKA_BOOTSTRAP_SERVERS``, or else the stack `conduit up` runs from the state
folder, which records its broker and topic prefix in ``stack.json`` and holds ``stack.lock`` (an
advisory lock the kernel releases when that process dies, however it dies) for as long as it runs.

Producers use ``acks="all"`` without idempotence: the embedded Tansu broker cannot do idempotent
producers (see real-peers), and every consumer is idempotent anyway, so at-least-once publishing
with deduplication downstream gives an exactly-once effect on both Tansu and Kafka.

A publisher also says in the logs when the broker cannot be reached and when it can again
(``BrokerConnection``): aiokafka retries on its own, and says nothing in the services.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAlreadyExistsError,
    for_code,
)
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from shared.events.envelope import Envelope, encode_event
from shared.events.topics import TOPICS, dead_letter
from shared.errors import ConnectionFailed, InvalidInput
from shared.partitioning import partition_for
from shared.settings import Settings
from shared.tls import ca_file_problem

log = logging.getLogger(__name__)


STACK_FILE = "stack.json"
STACK_LOCK = "stack.lock"

# The largest message a publisher sends (a broker must accept as much: Kafka's message.max.bytes,
# or the topic's max.message.bytes), and the largest record batch it builds.
MAX_REQUEST_SIZE = 8 * 1024 * 1024
_MAX_BATCH_SIZE = 1024 * 1024
# What a message too large for the producer or the broker fails with: sending it again cannot help.
TOO_LARGE: tuple[type[KafkaError], ...] = (MessageSizeTooLargeError, RecordListTooLargeError)
# Seconds between a publisher's looks at whether the broker can be reached.
BROKER_CHECK_INTERVAL = 5.0


@dataclass(frozen=True)
class RecordedStack:
    """What a `conduit up` wrote in its state folder about itself."""

    path: Path
    pid: int | None
    kafka_bootstrap_servers: str
    topic_prefix: str


def read_stack_record(state_dir: Path) -> RecordedStack | None:
    """``<state>/stack.json`` as written, running or not; None when there is none (or it is unreadable)."""
    path = state_dir / STACK_FILE
    try:
        record = json.loads(path.read_text())
        return RecordedStack(path, record.get("pid"), record["kafka_bootstrap_servers"],
                             record.get("topic_prefix", ""))   # no prefix: written before it was recorded
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def stack_lock_held(state_dir: Path) -> bool:
    """Whether a live process holds the state folder's stack lock (a `conduit up` that runs)."""
    try:
        with open(state_dir / STACK_LOCK, "rb") as lock:
            try:
                # Shared and released at once: a `conduit up` starting meanwhile waits out this instant.
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
            return False
    except OSError:
        return False   # no lock file: no stack ever ran here


def running_stack(state_dir: Path) -> RecordedStack | None:
    """The stack running from this state folder; a record its dead process left is no stack."""
    record = read_stack_record(state_dir)
    return record if record is not None and stack_lock_held(state_dir) else None


def with_running_stack(settings: Settings) -> Settings:
    """``settings`` pointed at the stack running from the state folder, when no broker is configured:
    its broker and its topic prefix, so a command's events reach that stack's services."""
    if settings.kafka_bootstrap_servers:
        return settings
    stack = running_stack(settings.state_dir)
    if stack is None:
        return settings
    if "topic_prefix" in settings.model_fields_set and settings.topic_prefix != stack.topic_prefix:
        # Publishing under another prefix than the stack's services read is a request nobody reads.
        raise InvalidInput(f"CONDUIT_TOPIC_PREFIX is {settings.topic_prefix!r}, but the stack running from "
                           f"{settings.state_dir} (pid {stack.pid}) uses {stack.topic_prefix!r}: unset it, or set "
                           "KAFKA_BOOTSTRAP_SERVERS to use another broker", reason="bad_setting")
    return settings.model_copy(update={"kafka_bootstrap_servers": stack.kafka_bootstrap_servers,
                                       "topic_prefix": stack.topic_prefix})


def bootstrap_servers(settings: Settings) -> str:
    """The configured servers, or the embedded broker that ``conduit up`` recorded in the state folder."""
    if settings.kafka_bootstrap_servers:
        return settings.kafka_bootstrap_servers
    record = read_stack_record(settings.state_dir)
    if record is not None and stack_lock_held(settings.state_dir):
        return record.kafka_bootstrap_servers
    if record is not None:
        raise ConnectionFailed(
            f"no Kafka broker: the stack recorded in {record.path} (pid {record.pid}) is no longer running; "
            "start it again with `conduit up`, or set KAFKA_BOOTSTRAP_SERVERS", reason="no_broker")
    raise ConnectionFailed(
        "no Kafka broker: set KAFKA_BOOTSTRAP_SERVERS, or start the embedded stack with `conduit up`",
        reason="no_broker",
    )


def client_options(settings: Settings) -> dict[str, Any]:
    """aiokafka's connection options (the settings themselves are checked in ``Settings``)."""
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(settings),
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism or "PLAIN"   # aiokafka's default, said here
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = (
            settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
        )
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = tls_context(settings)
    return options


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of every Kafka connection (aiokafka's clients here, faust's in evaluate's health
    aggregate): it verifies the broker's chain and host name against ``KAFKA_SSL_CA_FILE`` when set,
    which then replaces the system's CAs as a Kafka truststore does, else against the system's CAs."""
    ca_file = settings.kafka_ssl_ca_file
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        # Settings checked the file at start; this is one that changed on disk since.
        raise InvalidInput(f"KAFKA_SSL_CA_FILE {ca_file} cannot be used: {ca_file_problem(exc)}",
                           reason="bad_setting") from None


def topic_name(settings: Settings, name: str) -> str:
    """The physical topic: a prefix lets tests and tenants share one broker without collisions."""
    return f"{settings.topic_prefix}{name}"


def all_topic_names(settings: Settings) -> list[str]:
    names = []
    for name in TOPICS:
        names += [topic_name(settings, name), topic_name(settings, dead_letter(name))]
    return names


async def ensure_topics(settings: Settings, names: Iterable[str] | None = None) -> None:
    """Create topics with an explicit partition count (never rely on auto-creation's default)."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [n for n in (names or all_topic_names(settings)) if n not in existing]
        if wanted:
            try:
                response = await admin.create_topics(
                    [NewTopic(n, num_partitions=settings.topic_partitions, replication_factor=settings.topic_replication_factor) for n in wanted]
                )
            except TopicAlreadyExistsError:
                return  # another process created it first
            # The broker answers per topic, and aiokafka returns the answer rather than raising: a
            # creation refused (no CreateTopics right, a replication factor above the brokers) would
            # pass silently, and the service would fail later on a topic that does not exist.
            refused = refused_topics(response.topic_errors)
            if refused:
                raise InvalidInput(f"the Kafka broker refused to create the topics {refused}: grant Conduit's Kafka "
                                   "user the right to create them, or create them beforehand (deploy/k8s/README.md)",
                                   reason="topics_not_created")
    finally:
        await admin.close()


def refused_topics(topic_errors: Iterable[tuple]) -> str | None:
    """A CreateTopics answer's refusals, as one text (None when there are none): its entries are
    (topic, error code[, error message]); a topic that exists already is no refusal."""
    refused = [f"{error[0]} ({for_code(error[1]).__name__}{f': {error[2]}' if len(error) > 2 and error[2] else ''})"
               for error in topic_errors if error[1] not in (0, TopicAlreadyExistsError.errno)]
    return ", ".join(refused) or None


class Publisher:
    """Publishes enveloped events and waits for the broker's acknowledgement."""

    def __init__(self, settings: Settings, *, client_id: str, max_request_size: int = MAX_REQUEST_SIZE) -> None:
        self._settings = settings
        self._client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self.max_request_size = max_request_size
        # A batch never larger than a message may be: ``publish_many`` checks only what exceeds one.
        self._batch_size = min(_MAX_BATCH_SIZE, max_request_size)
        self.broker_check_interval = BROKER_CHECK_INTERVAL
        self.connection: BrokerConnection | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        options = client_options(self._settings)
        self._producer = AIOKafkaProducer(
            **options,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=False,
            linger_ms=2,
            max_batch_size=self._batch_size,
            max_request_size=self.max_request_size,
        )
        await self._producer.start()
        self.connection = BrokerConnection(self._producer.client, servers_for_logs(options["bootstrap_servers"]))
        self._watch = asyncio.create_task(self.connection.watch(self.broker_check_interval),
                                          name=f"{self._client_id}-broker-connection")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            # Whatever ended the watch (it only logs), the producer below must still stop.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch
            self._watch = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("publisher not started")
        return self._producer

    async def publish(self, topic: str, event: Envelope[Any], key: str, headers: list[tuple[str, bytes]] | None = None) -> None:
        await self.publish_raw(topic, encode_event(event), key, headers)

    async def publish_raw(self, topic: str, value: bytes, key: str, headers: list[tuple[str, bytes]] | None = None) -> None:
        await self.producer.send_and_wait(
            topic_name(self._settings, topic), value, key=key.encode(), headers=headers
        )

    async def publish_many(self, items: Iterable[tuple[str, bytes, str]]) -> None:
        """Send a batch and wait until every message is acknowledged (fails if any fails).

        Messages go into one record batch per partition (the producer's batch API) instead of one
        ``send`` each: ingest publishes 500 events per call, and per-message ``send`` (metadata
        wait, size estimate, murmur2 of the key, accumulator bookkeeping) was a quarter of its CPU.
        The partition is the default partitioner's choice for the key (``shared.partitioning``, the
        same murmur2 computed cheaper), so per-key order and placement are exactly what ``send``
        gives; order within a partition is the items' order.

        A message larger than ``max_request_size`` fails the call with ``MessageSizeTooLargeError``
        before anything is sent (aiokafka checks only what goes through ``send``: a batch takes its
        first record whatever its size).  The broker refuses what exceeds its own limit the same way,
        for a whole record batch, once it has been sent.  Neither can succeed on a retry (``TOO_LARGE``).
        """
        producer = self.producer
        items = list(items)
        for topic, value, key in items:
            # Cheap first: a key's UTF-8 takes at most 4 bytes a character; a record's overhead < 256.
            if len(value) + 4 * len(key) + 256 > self.max_request_size:
                size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key.encode(), value, [])
                if size > self.max_request_size:
                    raise MessageSizeTooLargeError(
                        f"an event for {topic} is {size} bytes, more than the producer's max_request_size "
                        f"({self.max_request_size})")
        partitions: dict[str, list[int]] = {}
        # (topic, key) -> (physical topic, key bytes, partition): a batch's items mostly share one
        # key (ingest: the mailbox), so the name, the encoding and murmur2 are done once per key.
        placed: dict[tuple[str, str], tuple[str, bytes, int]] = {}
        batches: dict[tuple[str, int], Any] = {}
        futures = []
        for topic, value, key in items:
            where = placed.get((topic, key))
            if where is None:
                physical = topic_name(self._settings, topic)
                key_bytes = key.encode()
                if physical not in partitions:
                    partitions[physical] = sorted(await producer.partitions_for(physical))
                known = partitions[physical]
                where = placed[(topic, key)] = (physical, key_bytes, partition_for(key_bytes, known))
            physical, key_bytes, partition = where
            batch = batches.get((physical, partition))
            if batch is None:
                batch = batches[(physical, partition)] = producer.create_batch()
            if batch.append(key=key_bytes, value=value, timestamp=None) is None:
                # Full (and so closed): send what it holds, in order, and start the next one (an empty
                # batch takes its first record whatever its size: one larger than a batch goes alone).
                futures.append(await producer.send_batch(batch, physical, partition=partition))
                batch = batches[(physical, partition)] = producer.create_batch()
                batch.append(key=key_bytes, value=value, timestamp=None)
        for (physical, partition), batch in batches.items():
            # Closed, the sender takes it at once; an open batch waits out linger_ms first (in
            # case ``send`` adds to it), and ingest publishes its batches one after another.
            batch.close()
            futures.append(await producer.send_batch(batch, physical, partition=partition))
        for future in futures:
            await future


def servers_for_logs(servers: str | list[str]) -> str:
    """The bootstrap servers as a log line names them: host and port, never a user or password that
    someone wrote into them (``user:secret@host:9092``)."""
    entries = servers.split(",") if isinstance(servers, str) else servers
    return ",".join(entry.strip().rsplit("@", 1)[-1] for entry in entries if entry.strip())


class BrokerConnection:
    """Whether the broker can be reached, said in the logs once per change: a WARNING when it is
    lost, an INFO when it is back, with the bootstrap servers named.

    aiokafka retries on its own, and in the services says nothing (``conduit run`` silences its
    logger: at WARNING it writes a line per retry, several a second), so an outage showed only on
    ``/readyz``.  This asks the broker for its metadata (no topic: a few bytes) every few seconds.
    """

    def __init__(self, client: AIOKafkaClient, servers: str, *, timeout: float = 10.0) -> None:
        self._client = client
        self.servers = servers
        self._timeout = timeout
        self.lost_since: float | None = None   # time.monotonic() of the first failed check of an outage
        self.checks = 0
        self.failed_checks = 0

    async def watch(self, every: float) -> None:
        """Check every ``every`` seconds until cancelled."""
        while True:
            await asyncio.sleep(every)
            try:
                await self.check()
            except Exception as exc:  # noqa: BLE001 - a watch that dies would say nothing of the next outage
                log.debug("the broker check failed unexpectedly: %r", exc)

    async def check(self) -> bool:
        """Whether a broker answers; logged when that changes."""
        problem = await self._problem()
        self.checks += 1
        if problem is None:
            if self.lost_since is not None:
                log.info("the Kafka broker at %s can be reached again (after %.0f s without it)",
                         self.servers, time.monotonic() - self.lost_since)
                self.lost_since = None
            return True
        self.failed_checks += 1
        if self.lost_since is None:
            self.lost_since = time.monotonic()
            log.warning("lost the connection to the Kafka broker at %s (%s): publishing and consuming wait until "
                        "it is back, which a line will say (this one is not repeated at each retry)", self.servers, problem)
        return False

    async def _problem(self) -> str | None:
        """None when one of the known brokers answers, else what the last one failed with."""
        problem = "no broker known"
        for broker in self._client.cluster.brokers():
            try:
                await asyncio.wait_for(self._client.send(broker.nodeId, MetadataRequest([])), self._timeout)
                return None
            except (KafkaError, OSError, TimeoutError) as exc:
                text = str(exc)   # aiokafka's errors begin with their name already
                problem = text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"
        return problem
