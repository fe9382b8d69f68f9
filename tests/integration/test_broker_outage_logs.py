"""A broker outage in the logs: one WARNING when the broker is lost, one INFO when it is back, with
the bootstrap servers named.  Before, a service said nothing (`conduit run` silences aiokafka, which
would otherwise write a line per retry) and only /readyz showed it.

Each test stops and starts a Tansu of its own, on its own port: the session's broker serves the
other tests."""
from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from conduit.broker import EmbeddedBroker
from shared.db.pool import database_url
from shared.kafka import Publisher
from shared.settings import Settings
from tests.support.databases import scratch_database
from tests.support.inbound import ServiceProcess, service_env
from tests.support.waiting import eventually

LOST = "lost the connection to the Kafka broker at"
BACK = "can be reached again"


@pytest.fixture
async def own_broker(state_dir: Path):
    broker = EmbeddedBroker(state_dir / f"tansu-outage-{uuid.uuid4().hex[:8]}.log")
    await broker.start()
    yield broker
    await broker.stop()


def own_settings(base_settings: Settings, broker: EmbeddedBroker) -> Settings:
    return base_settings.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap_servers,
                                            "topic_prefix": f"t{uuid.uuid4().hex[:10]}."})


async def test_a_publisher_says_once_that_the_broker_is_lost_and_once_that_it_is_back(
        base_settings: Settings, own_broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="aiokafka")   # as `conduit run` has it (conduit/cli/runner.py)
    caplog.set_level(logging.INFO, logger="shared.kafka")

    def said(text: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "shared.kafka" and text in r.getMessage()]

    async def saying(text: str) -> list[logging.LogRecord]:
        return said(text)

    publisher = Publisher(own_settings(base_settings, own_broker), client_id="tests-outage")
    publisher.broker_check_interval = 0.2
    await publisher.start()
    try:
        await own_broker.stop()
        await eventually(lambda: saying(LOST), what="a line saying the broker is lost")
        connection = publisher.connection
        assert connection is not None
        failed = connection.failed_checks

        async def checked_again() -> bool:
            return connection.failed_checks >= failed + 5
        await eventually(checked_again, what="five more checks failing")   # the outage goes on: no new line
        await own_broker.start()
        await eventually(lambda: saying(BACK), what="a line saying the broker is back")
    finally:
        await publisher.stop()
    (lost,), (back,) = said(LOST), said(BACK)
    assert lost.levelno == logging.WARNING and back.levelno == logging.INFO
    assert own_broker.bootstrap_servers in lost.getMessage() and own_broker.bootstrap_servers in back.getMessage()


async def test_a_service_log_says_when_the_broker_is_lost_and_when_it_is_back(
        base_settings: Settings, own_broker: EmbeddedBroker, tmp_path: Path) -> None:
    """`conduit run` as a pod runs it, with its own logging set-up: the lines are in its log."""
    settings = own_settings(base_settings, own_broker)
    log = tmp_path / "exchange_sync.log"
    async with scratch_database(database_url(base_settings), "outage", migrated=True) as url:
        env = service_env(settings, CONDUIT_LOG_LEVEL="INFO")
        env["DATABASE_URL"] = url   # a database of its own: its outbox relay takes no other test's rows
        service = ServiceProcess("exchange_sync", env, log)
        await service.start()
        try:
            await eventually(service.ready, timeout=60, what="exchange_sync ready")

            def lines(text: str) -> list[str]:
                return [line for line in log.read_text(errors="replace").splitlines() if text in line]

            async def logged(text: str) -> list[str]:
                return lines(text)

            await own_broker.stop()
            await eventually(lambda: logged(LOST), timeout=30, what="a line saying the broker is lost")
            await own_broker.start()
            await eventually(lambda: logged(BACK), timeout=30, what="a line saying the broker is back")
        finally:
            await service.stop()
    (lost,), (back,) = lines(LOST), lines(BACK)
    assert " WARNING shared.kafka: " in lost and own_broker.bootstrap_servers in lost
    assert " INFO shared.kafka: " in back and own_broker.bootstrap_servers in back
    assert service.problems() == [], service.tail()
