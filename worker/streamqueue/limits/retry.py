"""The model handlers' retry policy: which failures a later attempt may fix, how long to wait, and a
429's pause of the whole queue."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .calls import ModelLimits

log = logging.getLogger(__name__)

RETRY_AFTER_CAP_S = 120.0  # a longer Retry-After (or a far HTTP date) is cut to this


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header as seconds (a number or an HTTP date, at most ``RETRY_AFTER_CAP_S``);
    None when missing or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


class Retryable(Exception):
    """An attempt at the model API failed in a way a later attempt may not: a 429, a 5xx, a timeout.

    ``retry_after``: the seconds the API asked for (None: the caller's backoff decides);
    ``rate_limited``: a 429, so the whole queue backs off, not only this call.
    """

    def __init__(self, reason: str, retry_after: float | None = None, *, rate_limited: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.rate_limited = rate_limited


async def back_off(limits: ModelLimits | None, exc: Retryable, delay: float, what: str, attempt: int) -> None:
    """Wait ``delay`` seconds before attempt ``attempt + 1`` after ``exc``; ``what`` names the API in the log.

    A 429 pauses every worker of the queue (when the handler has limits): the next attempt's call then
    waits for that pause as every other call does. Any other failure waits here, for this call alone.
    """
    if exc.rate_limited and limits is not None:
        log.warning("%s: %s; every worker of the queue pauses %.1fs", what, exc, delay)
        await limits.pause(delay)
        return
    log.warning("%s: %s; retry %d in %.1fs", what, exc, attempt + 1, delay)
    await asyncio.sleep(delay)
