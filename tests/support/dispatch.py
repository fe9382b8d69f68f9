"""Set-ups the dispatch tests share: a sending mailbox on an SMTP peer, requests, and status reading."""
from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer
from pydantic import SecretStr

from shared.events.envelope import Envelope, encode_event
from shared.events.payloads import EmailOutboundV1, EmailStatusV1
from shared.kafka import Publisher, client_options, topic_name
from shared.registry.models import Organization
from shared.registry.service import ProfileInput, Registry
from shared.settings import Settings
from tests.support.waiting import eventually

FINAL = {"sent", "failed", "rejected"}


@dataclass
class Sender:
    mailbox_id: uuid.UUID
    email: str
    password: str | None
    profile: str


async def sending_mailbox(registry: Registry, org: Organization, *, host: str, port: int, tls: str = "none",
                          ca_file: str | None = None, password: str | None = None, owner: str = "user",
                          enable: bool = True, approve: bool = True, max_connections: int = 10,
                          profile: str | None = None) -> Sender:
    """A user's (or queue's) mailbox on an SMTP profile, approved and enabled for outgoing email."""
    profile = profile or f"smtp-{uuid.uuid4().hex[:6]}"
    existing = {p.name for p in await registry.profiles(org)} if hasattr(registry, "profiles") else set()
    if profile not in existing:
        await registry.add_profile(org, ProfileInput(
            name=profile, server_type="smtp", outgoing_host=host, outgoing_port=port, outgoing_tls=tls,
            use_same_settings_for_outgoing=False, tls_ca_file=ca_file, max_concurrent_connections=max_connections),
            make_default=True)
    email = f"{owner}-{uuid.uuid4().hex[:8]}@example.com"
    if owner == "user":
        await registry.add_user(org, f"User {email.split('@')[0]}", email)
    else:
        await registry.add_queue(org, f"Queue {email.split('@')[0]}", email)
    if password is not None:  # without: an unauthenticated relay
        await registry.set_credentials(org, email, email, SecretStr(password))
    await registry.update_mailbox(org, email, email_approved=approve, profile=profile)
    mailbox = await registry.mailbox(org, email)
    if enable:
        await registry.record_test(mailbox.id, "outgoing", True, "ok")
    return Sender(mailbox.id, email, password, profile)


def outbound(org: Organization | uuid.UUID, **data: Any) -> Envelope[EmailOutboundV1]:
    data.setdefault("idempotency_key", f"k-{uuid.uuid4().hex}")
    data.setdefault("to", ["rcpt@customer.example"])
    data.setdefault("subject", "Hello")
    data.setdefault("text", "Hi there.\n")
    org_id = org if isinstance(org, uuid.UUID) else org.id
    return Envelope[EmailOutboundV1](type="email.outbound", schema_version=1, producer="tests", organization_id=org_id,
                                     data=EmailOutboundV1(**data))


async def dead_worker(conn: Any) -> int:
    """A dispatch worker number whose lock nobody holds: a worker that died."""
    return await conn.fetchval("SELECT nextval('dispatch_worker_seq')")


async def orphan_row(conn: Any, worker_id: int, org_id: uuid.UUID, mailbox_id: uuid.UUID, key: str, message_id: str, *,
                     subject: str | None = None, request: str = "{}", started: bool = True) -> None:
    """A row ``worker_id`` left in `sending` at its first attempt (``started``: it had been cleared to
    reach its transport, so it may have left); ``request`` is the stored request's JSON."""
    await conn.execute(
        """INSERT INTO outbound_email (organization_id, idempotency_key, mailbox_id, status, message_id, subject,
                                       request, worker_id, attempts, started_at)
           VALUES ($1, $2, $3, 'sending', $4, $5, $6::text::jsonb, $7, 1, CASE WHEN $8 THEN now() END)""",
        org_id, key, mailbox_id, message_id, subject, request, worker_id, started)


async def publish(publisher: Publisher, *events: Envelope[Any]) -> None:
    await publisher.publish_many(("email.outbound", encode_event(e), e.data.idempotency_key) for e in events)


async def publish_raw(publisher: Publisher, payloads: list[tuple[bytes, str]]) -> None:
    await publisher.publish_many(("email.outbound", value, key) for value, key in payloads)


class StatusReader:
    """Reads `email.status` from the beginning; ``by_key`` holds every status per idempotency key, in order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.by_key: dict[str, list[EmailStatusV1]] = {}
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> "StatusReader":
        self._consumer = AIOKafkaConsumer(topic_name(self.settings, "email.status"), **client_options(self.settings),
                                          group_id=f"status-{uuid.uuid4().hex[:8]}", auto_offset_reset="earliest",
                                          enable_auto_commit=False)
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._consumer is not None
        await self._consumer.stop()

    async def poll(self) -> dict[str, list[EmailStatusV1]]:
        assert self._consumer is not None
        batches = await self._consumer.getmany(timeout_ms=100, max_records=10_000)
        for records in batches.values():
            for record in records:
                event = Envelope[EmailStatusV1].model_validate_json(record.value)
                self.by_key.setdefault(event.data.idempotency_key, []).append(event.data)
        return self.by_key

    def final(self, key: str) -> EmailStatusV1 | None:
        finals = [s for s in self.by_key.get(key, []) if s.status in FINAL]
        return finals[-1] if finals else None

    def statuses(self, key: str) -> list[str]:
        return [s.status for s in self.by_key.get(key, [])]


@contextlib.asynccontextmanager
async def dispatch_running(settings: Settings, **options: Any) -> AsyncIterator[None]:
    """A dispatch service working in the background (its own consumer group) for the block's length."""
    from services.dispatch.service import DispatchService
    from services.dispatch.settings import DispatchSettings
    from shared.lifecycle import run_service

    stopping = asyncio.Event()
    service = DispatchService(settings, DispatchSettings(**{"poll_seconds": 0.1, **options}),
                              group_id=f"d-{uuid.uuid4().hex[:8]}")
    running = asyncio.create_task(run_service(service, stopping=stopping))
    try:
        yield
    finally:
        stopping.set()
        await running


async def dispatch(settings: Settings, **options: Any) -> Any:
    """Dispatch in burst mode (its own consumer group) until the topic is drained; quick retries."""
    from services.dispatch.service import DispatchService
    from services.dispatch.settings import DispatchSettings
    from shared.lifecycle import run_service

    options.setdefault("retry_base_seconds", 0.05)
    options.setdefault("poll_seconds", 0.1)
    service = DispatchService(settings, DispatchSettings(**options), group_id=f"dispatch-{uuid.uuid4().hex[:8]}")
    await run_service(service, burst=True)
    return service


async def finals(settings: Settings, keys: list[str], *, timeout: float = 20) -> StatusReader:
    """Every status of ``keys`` read from `email.status`, once each has a final one."""
    reader = StatusReader(settings)
    async with reader:
        async def done() -> bool:
            await reader.poll()
            return all(reader.final(k) for k in keys)
        await eventually(done, timeout=timeout, what="final statuses")
    return reader
