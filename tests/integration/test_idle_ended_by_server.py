"""A server that ends each IDLE itself, at once, with its tagged OK (a short idle limit of its own, or a
middlebox answering for it): the runner looks at the Inbox on the profile's polling interval then,
and mail is still ingested; it does not go round EXAMINE, IDLE, EXAMINE, ... as fast as the server
answers.  Against Dovecot, through a relay that answers IDLE in its place.
"""
from __future__ import annotations

import asyncio
import re
import time

from services.ingest.runner import MailboxRunner, RunnerContext, ServerSlots
from shared.oauth import TokenProvider
from shared.registry.service import Registry
from tests.support.inbound import mailbox_ingested
from tests.support.mailboxes import imap_profile, message, ready_mailbox
from tests.support.relay import line_relay

_IDLE = re.compile(rb"^(\S+) IDLE\r\n$", re.IGNORECASE)


async def test_a_server_ending_each_idle_at_once_is_polled_not_looped(
        settings, registry: Registry, org, dovecot, pool, publisher) -> None:
    idles: list[float] = []

    def on_line(line: bytes) -> bytes | None:
        if (idle := _IDLE.match(line)) is None:
            return None
        idles.append(time.monotonic())
        return b"+ idling\r\n" + idle.group(1) + b" OK IDLE terminated (no idling here)\r\n"

    relay, port = await line_relay(dovecot.host, dovecot.imap_port, on_line)
    await registry.add_profile(org, imap_profile(dovecot, incoming_host="127.0.0.1", incoming_port=port,
                                                 min_polling_interval_seconds=1))
    box = await ready_mailbox(registry, org, dovecot)
    work = (await registry.mailboxes_to_process("incoming", mailbox_ids=[box.id]))[0]
    runner = MailboxRunner(RunnerContext(pool, publisher, registry, ServerSlots(), TokenProvider()), work, idle_allowed=True)
    stopping = asyncio.Event()
    task = asyncio.create_task(runner.run(stopping))
    try:
        await dovecot.append(box.email, box.password, message("first", to=box.email))
        await mailbox_ingested(registry, org, box.email, 1)
        start, before = time.monotonic(), len(idles)
        await dovecot.append(box.email, box.password, message("second", to=box.email))
        await mailbox_ingested(registry, org, box.email, 2)   # found by polling, within the interval
        await asyncio.sleep(3)   # a window to count IDLE commands in, not a wait for anything
        rate = (len(idles) - before) / (time.monotonic() - start)
        assert not task.done(), task
    finally:
        stopping.set()
        await asyncio.wait_for(task, 30)
        relay.close()
    assert idles, "the runner idled"
    assert rate <= 2, f"{rate:.0f} IDLE commands a second: a loop, not polling every second"
    state = await registry.mailbox(org, box.email)
    assert not state.alerts and state.incoming.error_count == 0
