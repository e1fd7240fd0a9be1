"""Asyncio helpers shared by the worker's long-running tasks."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_set(event: asyncio.Event, seconds: float) -> None:
    """Wait until ``event`` is set, at most ``seconds``: a sleep that a stop, an arrival or a release
    cuts short. The caller looks at the event (or whatever it signals) afterwards."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
