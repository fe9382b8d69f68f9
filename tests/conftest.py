"""Real peers for the whole suite: one embedded PostgreSQL and one Tansu broker per test session.

Tests never share names: each gets its own organization and its own topic prefix, so nothing needs
cleaning up between tests and tests cannot race on each other's data.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import AsyncIterator, Iterator

import asyncpg
import pytest

from conduit.broker import EmbeddedBroker
from shared.crypto import load_cipher
from shared.db.migrate import migrate
from shared.db.pool import create_pool, embedded_database_url
from shared.kafka import Publisher, ensure_topics
from shared.registry.models import Organization
from shared.registry.service import Registry
from shared.settings import Settings


@pytest.fixture(scope="session")
def state_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: its parents are private to root, and the embedded PostgreSQL runs as
    # its own system user, which must be able to reach its data folder.
    path = Path(tempfile.mkdtemp(prefix="conduit-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
async def broker(state_dir: Path) -> AsyncIterator[EmbeddedBroker]:
    b = EmbeddedBroker(state_dir / "tansu.log")
    await b.start()
    yield b
    await b.stop()


@pytest.fixture(scope="session")
async def base_settings(state_dir: Path, broker: EmbeddedBroker) -> Settings:
    settings = Settings(CONDUIT_STATE_DIR=str(state_dir), KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
                        CONDUIT_HEALTH_PORT=0)
    embedded_database_url(settings)  # start the embedded server once for the session
    pool = await create_pool(settings, max_size=1)
    async with pool.acquire() as conn:
        await migrate(conn)
    await pool.close()
    return settings


@pytest.fixture
async def settings(base_settings: Settings) -> Settings:
    """Session settings with a topic prefix of this test's own."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    s = base_settings.model_copy(update={"topic_prefix": prefix})
    await ensure_topics(s)
    return s


@pytest.fixture(scope="session")
async def pool(base_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(base_settings, max_size=10)
    yield p
    await p.close()


@pytest.fixture
async def registry(pool: asyncpg.Pool, base_settings: Settings) -> Registry:
    return Registry(pool, load_cipher(base_settings), producer="tests")


@pytest.fixture
async def org(registry: Registry) -> Organization:
    return await registry.add_organization(f"org-{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def publisher(settings: Settings) -> AsyncIterator[Publisher]:
    p = Publisher(settings, client_id="tests")
    await p.start()
    yield p
    await p.stop()


@pytest.fixture(autouse=True)
def fail_on_internal_errors(caplog: pytest.LogCaptureFixture) -> None:
    """A test fails if Conduit logged an internal error (an exception it did not expect)."""
    caplog.set_level(logging.WARNING)
    yield
    bad = [r for r in caplog.get_records("call")
           if r.levelno >= logging.ERROR and r.name.split(".")[0] in ("shared", "services", "conduit")
           and not getattr(r, "expected", False)]
    assert not bad, "internal errors logged: " + "; ".join(r.getMessage() for r in bad)


@pytest.fixture(scope="session")
async def dovecot(state_dir: Path):
    """One private Dovecot (IMAP and POP3, plaintext on loopback) for the session; tests add their own users."""
    from conduit.peers.dovecot import Dovecot

    server = Dovecot(state_dir / "dovecot")
    await server.start()
    yield server
    await server.stop()
