"""Ingest's count of the sessions open to one server: a limit edited while sessions are open is
kept by them all, old and new (the old count and a new one side by side let both sets open)."""
from __future__ import annotations

import asyncio

from services.ingest.runner import ConnectionSlots, ServerSlots


async def _enter(slots: ConnectionSlots, entered: list[int], n: int, leave: asyncio.Event) -> None:
    async with slots:
        entered.append(n)
        await leave.wait()


async def _settled() -> None:
    for _ in range(5):   # every task that can run has run
        await asyncio.sleep(0)


async def test_a_lowered_limit_opens_nothing_until_enough_have_ended_and_a_raised_one_opens_at_once() -> None:
    slots, entered, leave = ConnectionSlots(2), [], [asyncio.Event() for _ in range(5)]
    tasks = [asyncio.create_task(_enter(slots, entered, n, leave[n])) for n in range(3)]
    await _settled()
    assert entered == [0, 1] and slots.in_use == 2
    slots.resize(3)
    await _settled()
    assert entered == [0, 1, 2]
    slots.resize(1)
    tasks.append(asyncio.create_task(_enter(slots, entered, 3, leave[3])))
    for n in (0, 1):
        leave[n].set()
        await _settled()
        assert entered == [0, 1, 2] and slots.in_use == 2 - n   # still 1 or more open: the limit is 1
    leave[2].set()
    await _settled()
    assert entered == [0, 1, 2, 3] and slots.in_use == 1
    leave[3].set()
    await asyncio.gather(*tasks)
    assert slots.in_use == 0


async def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    slots, entered, leave = ConnectionSlots(1), [], [asyncio.Event() for _ in range(3)]
    await slots.__aenter__()
    second = asyncio.create_task(_enter(slots, entered, 1, leave[1]))
    third = asyncio.create_task(_enter(slots, entered, 2, leave[2]))
    await _settled()
    await slots.__aexit__(None, None, None)   # wakes the second (no step of the loop in between) ...
    second.cancel()                            # ... which is cancelled before it runs
    await _settled()
    assert entered == [2]
    leave[2].set()
    await third
    assert second.cancelled() and slots.in_use == 0


def test_a_runner_on_the_profile_before_an_edit_does_not_set_its_limit_back() -> None:
    server = ServerSlots()
    before = server.for_server("p", "imap.example", 993, 2, "2026-11-29T10:00:00.000000+00:00")
    after = server.for_server("p", "imap.example", 993, 3, "2026-11-29T11:00:00.000000+00:00")
    assert after is before and before.limit == 3
    assert server.for_server("p", "imap.example", 993, 2, "2026-11-29T10:00:00.000000+00:00").limit == 3
    assert server.for_server("p", "other.example", 993, 2, "").limit == 2   # another server: its own count
