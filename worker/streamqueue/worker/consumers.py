"""Runs entries concurrently on a pool of long-lived coroutines instead of one task per entry.

A task per entry costs a task object, a scheduled first step and a loop turn even when the handler
never suspends (a third of a no-op worker's CPU went there). Here a consumer keeps taking queued
entries for as long as their handlers finish without suspending, so a batch of quick entries runs in
one loop turn. Concurrency is kept by waking the next consumer whenever one takes an entry and more
are queued: if the handler suspends, that consumer picks up the next entry, and so on. At most one
consumer is being woken at a time, so quick entries do not wake the whole pool for nothing.

The pool never holds more consumers than entries were ever in flight at once; the caller bounds that.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ConsumerPool(Generic[T]):
    """``submit`` queues an item; ``handle(item)`` runs for it on one of the pool's consumers."""

    def __init__(self, handle: Callable[[T], Awaitable[None]], name: str) -> None:
        self._handle = handle
        self._name = name
        self._queue: deque[T] = deque()
        self._parked: deque[asyncio.Future[None]] = deque()
        self._waking = False  # a consumer was woken (or started) and has not run yet
        self.tasks: set[asyncio.Task[None]] = set()  # cancelling them cancels the entries they run

    def submit(self, item: T) -> None:
        self._queue.append(item)
        if not self._waking:
            self._wake_one()

    def _wake_one(self) -> None:
        self._waking = True
        while self._parked:
            parked = self._parked.popleft()
            if not parked.done():
                parked.set_result(None)
                return
        task = asyncio.create_task(self._consume(), name=f"{self._name}-{len(self.tasks)}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        self._waking = False
        while True:
            if not self._queue:
                parked = loop.create_future()
                self._parked.append(parked)
                await parked
                self._waking = False
                continue
            item = self._queue.popleft()
            if self._queue and not self._waking:
                self._wake_one()  # in case this handler suspends, the next entry must not wait for it
            await self._handle(item)
