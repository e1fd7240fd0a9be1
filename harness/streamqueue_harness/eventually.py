"""The one polling helper of the harness, the benchmarks and the tests: wait for a state reached elsewhere.

Controllers, watches, worker processes, servers starting up and Redis converge on their own schedule;
a caller waits for the observable result, bounded, and fails naming what it waited for and the last
value it saw. A probe that knows the wait is hopeless (the process it waits for exited) raises, and
that error ends the wait at once. Harness code passes its own ``error`` type so a start-up failure
reads as one, not as a failed assertion.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


def eventually(
    probe: Callable[[], T],
    what: str,
    timeout: float = 30.0,
    interval: float = 0.1,
    error: type[Exception] = AssertionError,
) -> T:
    """``probe()``'s first truthy result; past ``timeout``, ``error`` naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(_timed_out(what, timeout, value))
        time.sleep(interval)


@overload
async def eventually_async(
    probe: Callable[[], Awaitable[T]],
    what: str,
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
    error: type[Exception] = ...,
) -> T: ...


@overload
async def eventually_async(
    probe: Callable[[], T],
    what: str,
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
    error: type[Exception] = ...,
) -> T: ...


async def eventually_async(
    probe: Callable[[], Any],
    what: str,
    timeout: float = 30.0,  # noqa: ASYNC109 - the same signature as eventually, on purpose
    interval: float = 0.05,
    error: type[Exception] = AssertionError,
) -> Any:
    """``eventually`` for asyncio: an ``async def`` probe is awaited; a blocking one runs in a thread
    so the loop (the workers, the client under test) keeps running while it blocks."""
    deadline = time.monotonic() + timeout
    while True:
        value = await _probe_once(probe)
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(_timed_out(what, timeout, value))
        await asyncio.sleep(interval)


async def _probe_once(probe: Callable[[], Any]) -> Any:
    if inspect.iscoroutinefunction(probe):
        return await probe()
    return await asyncio.to_thread(probe)


def _timed_out(what: str, timeout: float, last: object) -> str:
    return f"timed out after {timeout:g}s waiting for {what}; last value: {last!r}"
