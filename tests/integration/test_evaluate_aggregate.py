"""Evaluate's mailbox health aggregate is monitoring: mail is evaluated while it cannot start.

An operator audit found evaluate waiting, with no limit, for the aggregate's start before it consumed
anything: after a broker restart the aggregate's table recovery never ended, and no mail became an
activity while /readyz said ready.  Here the aggregate's start never finishes (standing in for that
recovery); the broker, PostgreSQL and Dovecot are real.  Also: a state folder that does not exist yet
(a pod's empty /tmp) is created for the aggregate's table."""
from __future__ import annotations

import asyncio

import pytest

from services.evaluate import service as evaluate_service
from services.evaluate.service import EvaluateService
from services.evaluate.settings import EvaluateSettings
from services.ingest.service import IngestService
from shared.lifecycle import run_service
from shared.registry.service import Registry
from tests.support.mailboxes import imap_profile, message, ready_mailbox
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers


async def test_mail_is_evaluated_while_the_health_aggregate_cannot_start(
        settings, registry: Registry, org, dovecot, pool, monkeypatch, tmp_path) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    box = await ready_mailbox(registry, org, dovecot, tracking="all")
    dovecot.deliver(box.email, message("While the aggregate starts", message_id="<agg-1@customer.example>"))
    await run_service(IngestService(settings), burst=True)

    starts = 0
    never = asyncio.Event()

    async def start_that_never_ends(_settings, **_):
        nonlocal starts
        starts += 1
        await never.wait()

    monkeypatch.setattr(evaluate_service, "start_health", start_that_never_ends)
    worker = EvaluateService(settings, evaluate_settings=EvaluateSettings(health_start_seconds=0.5))
    stopping = asyncio.Event()
    running = asyncio.create_task(run_service(worker, stopping=stopping))
    try:
        async def tracked() -> bool:
            async with pool.acquire() as conn:
                return bool(await conn.fetchval("SELECT count(*) FROM email_activity WHERE organization_id = $1", org.id))
        await eventually(tracked, timeout=30, what="the message to become an activity")

        async def tried_again() -> bool:
            return starts >= 2 or running.done()
        await eventually(tried_again, timeout=30, what="the aggregate's start to be tried again")
        assert not running.done()
    finally:
        stopping.set()
        await asyncio.wait_for(running, 30)


async def test_the_aggregates_state_folder_is_created_when_missing(base_settings, monkeypatch, tmp_path) -> None:
    """A pod's /tmp starts empty: CONDUIT_STATE_DIR=/tmp/conduit does not exist when evaluate starts,
    and faust refused to start its table there ("cannot use .../conduit/faust")."""
    state_dir = tmp_path / "empty-tmp" / "conduit"
    seen: list[bool] = []
    stopping = asyncio.Event()

    async def start(settings, **_):
        seen.append(settings.state_dir.is_dir())
        stopping.set()
        raise RuntimeError("stop here")

    monkeypatch.setattr(evaluate_service, "start_health", start)
    worker = EvaluateService(base_settings.model_copy(update={"state_dir": state_dir}))
    await asyncio.wait_for(worker._health_aggregate(stopping), 10)
    assert seen == [True]
