"""Asyncio helpers shared by the worker's long-running tasks, and the event loop its processes run on."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("streamqueue.worker")


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop if it is installed (the ``uvloop`` extra; the images install it), else
    on asyncio's loop: uvloop's loop spends less CPU per message and per streamed token (measured,
    docs/benchmarks.md). For the worker and gateway processes; a library user picks their own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


# How long a cancelled task is given to end before it is asked again; also the margin a blocking
# read is given beyond its BLOCK time to return by itself.
CANCEL_PATIENCE_S = 1.0


async def wait_set(event: asyncio.Event, seconds: float) -> None:
    """Wait until ``event`` is set, at most ``seconds``: a sleep that a stop, an arrival or a release
    cuts short. The caller looks at the event (or whatever it signals) afterwards."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


async def cancel(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait for them to end, asking again if a cancellation got lost.

    A cancellation that lands exactly as a library call times out can be turned into an ordinary
    error (and retried) instead of ending the task; shutdown must not hang on that.
    """
    for task in tasks:
        task.cancel()
    pending = {task for task in tasks if not task.done()}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=CANCEL_PATIENCE_S)
        for task in pending:
            where = io.StringIO()
            task.print_stack(limit=4, file=where)
            log.warning(
                "task %s ignored cancellation; cancelling again\n%s", task.get_name(), where.getvalue()
            )
            task.cancel()
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a failure is reported by the caller, not as "never retrieved"
