"""The in-flight limit shared by the reader and the reclaimer.

Both ask Redis for at most as many entries as there are free slots, so an entry is never delivered to
this consumer (and its idle clock started) while it would wait behind a full process. ``give`` does not
await, so a cancelled task can always return its slot from a ``finally`` block.
"""

from __future__ import annotations

import asyncio


class Slots:
    """A counting limit whose ``take`` grabs up to ``n`` free slots at once (at least one)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._free = total
        self._changed = asyncio.Event()

    @property
    def free(self) -> int:
        return self._free

    async def take(self, n: int) -> int:
        """Wait for a free slot, then take ``min(n, free)`` of them."""
        while self._free == 0:
            self._changed.clear()
            await self._changed.wait()
        return self.take_now(n)

    def take_now(self, n: int) -> int:
        """Take up to ``n`` free slots without waiting (possibly none)."""
        taken = min(n, self._free)
        self._free -= taken
        return taken

    def give(self, n: int = 1) -> None:
        if n:
            self._free += n
            self._changed.set()

    async def wait_idle(self) -> None:
        """Return once every slot is free again (all in-flight work done)."""
        while self._free < self.total:
            self._changed.clear()
            await self._changed.wait()
