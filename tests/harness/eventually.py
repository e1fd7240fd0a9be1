"""The one polling helper of the tests: wait for a condition the system reaches asynchronously.

Controllers, watches, worker processes and Redis converge on their own schedule; a test waits for
the observable result, bounded, and fails naming what it waited for and the last value it saw.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(probe: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.1) -> T:
    """Return ``probe()``'s first truthy result; fail naming ``what`` and the last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {value!r}")
        time.sleep(interval)


async def eventually_async(
    probe: Callable[[], T],
    what: str,
    timeout: float = 30.0,  # noqa: ASYNC109 - the same signature as eventually, on purpose
    interval: float = 0.05,
) -> T:
    """``eventually`` for async tests: the blocking ``probe`` runs in a thread, the loop keeps running."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(probe)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {value!r}")
        await asyncio.sleep(interval)
