"""Mailbox leases: one replica per mailbox, and a dead replica's mailboxes are taken over."""
from __future__ import annotations

import uuid

import asyncpg

from services.ingest.leases import Leases
from shared.registry.service import Registry
from tests.support.mailboxes import imap_profile


async def _mailboxes(registry: Registry, org, dovecot, n: int) -> list[uuid.UUID]:
    await registry.add_profile(org, imap_profile(dovecot))
    ids = []
    for i in range(n):
        user = await registry.add_user(org, f"U{i}", f"lease-{uuid.uuid4().hex[:8]}@example.com")
        ids.append(user.mailbox_id)
    return ids


async def test_a_mailbox_has_one_holder_and_expired_leases_are_taken_over(registry: Registry, org, dovecot, pool: asyncpg.Pool) -> None:
    ids = await _mailboxes(registry, org, dovecot, 4)
    first, second = Leases(pool, f"a-{uuid.uuid4().hex[:6]}"), Leases(pool, f"b-{uuid.uuid4().hex[:6]}")
    held_by_first = await first.claim(ids)
    assert held_by_first == set(ids)
    assert await second.claim(ids) == set()  # all held and alive: nothing to take
    async with pool.acquire() as conn:  # the first replica dies: its leases run out
        await conn.execute("UPDATE mailbox_lease SET expires_at = now() - interval '1 second' WHERE holder = $1", first.holder)
    assert await second.claim(ids) == set(ids)
    async with pool.acquire() as conn:
        holders = await conn.fetch("SELECT DISTINCT holder FROM mailbox_lease WHERE mailbox_id = ANY($1::uuid[])", ids)
    assert [h["holder"] for h in holders] == [second.holder]
    await second.release_all()
