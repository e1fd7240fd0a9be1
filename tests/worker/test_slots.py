"""The in-flight limit: never more taken than exists, waiters wake when slots come back."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st
from streamqueue.worker.slots import Slots


@given(total=st.integers(1, 50), ops=st.lists(st.tuples(st.booleans(), st.integers(1, 60)), max_size=60))
def test_taken_slots_never_exceed_the_total(total: int, ops: list[tuple[bool, int]]) -> None:
    slots = Slots(total)
    taken = 0
    for is_take, n in ops:
        if is_take:
            got = slots.take_now(n)
            assert 0 <= got <= n
            taken += got
        else:
            back = min(n, taken)
            slots.give(back)
            taken -= back
        assert 0 <= taken <= total
        assert slots.free == total - taken


async def test_take_waits_for_a_slot_and_wait_idle_for_all() -> None:
    slots = Slots(2)
    assert await slots.take(5) == 2
    waiter = asyncio.create_task(slots.take(1))
    idle = asyncio.create_task(slots.wait_idle())
    for _ in range(10):
        await asyncio.sleep(0)  # loop steps, not time: both tasks run until they block, and must stay blocked
    assert not waiter.done() and not idle.done()
    slots.give(1)
    assert await asyncio.wait_for(waiter, 1) == 1
    assert not idle.done()
    slots.give(2)
    await asyncio.wait_for(idle, 1)
