"""A message moved into a folder a folder-level tracking rule maps is announced again on
`email.received`, marked ``refiled``, and the mailbox health aggregate does not count it as received
mail a second time.  Ingest (Dovecot), evaluate and the aggregate (faust on the broker) run for real."""
from __future__ import annotations

import asyncio
import imaplib
import json

import pytest
from aiokafka import AIOKafkaConsumer

from services.evaluate.health import start_health
from shared.kafka import client_options, topic_name
from shared.registry.service import Registry
from tests.e2e.test_folder_tracking import _move_all, pipeline
from tests.support.mailboxes import imap_profile, message, ready_mailbox
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers


async def received_events(settings, expected: int, timeout: float = 15.0) -> list[tuple[int, int, dict]]:
    """(partition, offset, event) of every `email.received` event of the test, once there are ``expected``."""
    consumer = AIOKafkaConsumer(topic_name(settings, "email.received"), **client_options(settings),
                                group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    events: list[tuple[int, int, dict]] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                events += [(r.partition, r.offset, json.loads(r.value)) for r in records]
            if len(events) >= expected and not batch:
                break
    finally:
        await consumer.stop()
    return sorted(events, key=lambda e: (e[0], e[1]))


async def test_a_refiled_message_is_not_counted_as_received_again(settings, registry: Registry, org, dovecot) -> None:
    await registry.add_profile(org, imap_profile(dovecot))
    acme = await registry.add_record(org, "account", "Acme", "info@acme.example")
    box = await ready_mailbox(registry, org, dovecot, tracking="all", tracked_folders=["INBOX", "Projects"])
    await registry.add_folder_rule(org, box.email, "Acme", f"account:{acme.id}")
    await asyncio.to_thread(_create_folder, dovecot, box, "Acme")
    await dovecot.append(box.email, box.password, message("Order 30", sender="buyer@stranger.example",
                                                          message_id="<refiled-1@stranger.example>"), folder="Projects")
    await pipeline(settings)
    await asyncio.to_thread(_move_all, dovecot, box, "Projects", "Acme")
    await pipeline(settings)   # the moved message is announced again, from Acme
    # New mail after the re-announcement, on the same partition (the key is the mailbox): once the
    # aggregate has applied it, it has seen the re-announcement before it.
    await dovecot.append(box.email, box.password, message("Order 31", sender="buyer@stranger.example",
                                                          message_id="<refiled-2@stranger.example>"))
    await pipeline(settings)

    events = await received_events(settings, 3)
    assert [(e["data"]["message_id"], e["data"]["folder"], e["data"]["refiled"]) for _, _, e in events] == [
        ("refiled-1@stranger.example", "Projects", False),
        ("refiled-1@stranger.example", "Acme", True),
        ("refiled-2@stranger.example", "INBOX", False)]
    partition, last_offset, _ = events[-1]

    health = await start_health(settings)
    try:
        async def applied_through_the_last() -> bool:
            record = health.health(box.id)
            return bool(record and record.applied.get(f"email.received/{partition}", -1) >= last_offset)

        await eventually(applied_through_the_last, timeout=90, what="the aggregate to apply every email.received event")
        record = health.health(box.id)
        assert record is not None
        assert record.messages_received == 2, record   # two messages received; the move is no third
    finally:
        await health.stop()


def _create_folder(dovecot, box, folder: str) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=30) as imap:
        imap.login(box.email, box.password)
        typ, data = imap.create(folder)
        assert typ == "OK", data
        imap.logout()
