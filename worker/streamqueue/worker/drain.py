"""A partition run's drain: stop taking work, give the entries in flight the grace period, cancel
what is left and hand every entry still owned back to the group, so other workers take it at once."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import ResponseError

from ..aio import CANCEL_PATIENCE_S, cancel
from ..connection import CONNECTION_ERRORS
from .consumers import ConsumerPool
from .inflight import InFlight
from .outbox import Outbox
from .reclaim import PendingOwnership

log = logging.getLogger("streamqueue.worker")
_HAND_BACK_TIMEOUT_S = 5.0


async def stop_intake(intake: asyncio.Task[None], *, reading: bool, block_ms: int, grace_s: float) -> None:
    """Stop taking work. A read already on the wire (``reading``) may have been delivered to this
    consumer by Redis: let it return (BLOCK bounds the wait) so its entries are handled here, not
    handed back."""
    if reading:
        await asyncio.wait([intake], timeout=min(block_ms / 1000 + CANCEL_PATIENCE_S, grace_s))
    await cancel(intake)


async def finish_in_flight(
    inflight: InFlight, consumers: ConsumerPool[Any], outbox: Outbox, *, grace_s: float
) -> None:
    """Give in-flight entries the grace period; cancel what is left (it stays pending)."""
    try:
        await asyncio.wait_for(inflight.idle.wait(), timeout=grace_s)
    except TimeoutError:
        log.warning("grace period over: %d entries unfinished are handed back to the group", len(inflight))
        outbox.abandon()
    await cancel(*consumers.tasks)  # also the idle ones, parked until cancelled


async def hand_back(pending: PendingOwnership, *, stream: str, group: str) -> None:
    """Hand back every entry this consumer still owns, so other workers take it over at once."""
    try:
        released = await asyncio.wait_for(pending.release_all(), timeout=_HAND_BACK_TIMEOUT_S)
    except (*CONNECTION_ERRORS, ResponseError, TimeoutError) as exc:
        log.warning("could not hand back pending entries (they will be reclaimed when idle): %s", exc)
        return
    if released:
        log.info("%s: handed back %d pending entries to group %s", stream, released, group)
