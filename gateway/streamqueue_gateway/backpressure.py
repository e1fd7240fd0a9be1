"""Refuse new requests while the queue's backlog (lag + pending) is above ``maxBacklog``.

The backlog is counted exactly as the operator scales on it (``streamqueue.observation``: a lag Redis
cannot tell is estimated from above, a partition without the group counts its whole stream). Each
gateway process reads it at most once per ``refresh_s`` (one pipelined XINFO round trip, shared by
every request that arrives meanwhile), so checking costs no Redis call per request.

A failed read costs in proportion to the failure. The last good read keeps deciding for up to
``stale_s`` (``MAX_STALE_S``, 5 s) while reads fail, so one pool hiccup or a slow answer refuses
nobody; the next read is tried on the first request after a short backoff (redis-py's
``EqualJitterBackoff``, as ``streamqueue.connection.RETRY_BACKOFF``: 25-50 ms after the first failure,
doubling to 1-2 s), not a whole refresh interval later; while a read is in flight, requests that have
a usable value do not wait for it. Fail closed: with no good read younger than ``stale_s`` (Redis down
for longer, or at start-up) the answer is Overloaded (503, reason ``redis``); a request is never
queued without a recent answer that the queue can take it, and requests never pile up waiting for
Redis (a read gives up after ``timeout_s``).

Retry-After: the time the workers need to bring the backlog back under the limit at the rate they
read entries between the last two reads, within [``refresh_s``, ``MAX_RETRY_S``]; ``UNKNOWN_RATE_RETRY_S``
before a second read or while the workers read nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis
from streamqueue import wire
from streamqueue.connection import RETRY_BACKOFF, RedisClient
from streamqueue.observation import Observation, add_reads, from_pipeline

log = logging.getLogger(__name__)

MAX_RETRY_S = 60.0
UNKNOWN_RATE_RETRY_S = 5.0
TIMEOUT_S = 2.0
MAX_STALE_S = 5.0
# Overloaded's reasons (the rejected-requests metric's label): the backlog is above the limit, or it
# could not be read.
BACKLOG = "backlog"
BACKLOG_UNKNOWN = "redis"


class Overloaded(Exception):
    """The queue is too far behind (or Redis cannot tell): the app answers 503 with Retry-After."""

    def __init__(self, retry_after_s: float, reason: str) -> None:
        super().__init__(f"overloaded ({reason}), retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s
        self.reason = reason


def backlog_of(obs: Observation) -> int:
    """Lag + pending; with the group missing (no worker started yet) the whole stream waits."""
    return obs.stream_length if obs.group_missing else obs.backlog


def drain_seconds(excess: int, previous: Observation | None, current: Observation) -> float | None:
    """Seconds to work off ``excess`` entries at the rate entries were read between two observations
    (``at`` in monotonic seconds); None when the rate is unknown or zero."""
    if previous is None or previous.entries_read is None or current.entries_read is None:
        return None
    elapsed, done = current.at - previous.at, current.entries_read - previous.entries_read
    if elapsed <= 0 or done <= 0:
        return None
    return excess * elapsed / done


class Backlog:
    """One queue's admission check, shared by every request of a gateway process for that queue."""

    def __init__(
        self,
        redis: RedisClient,
        stream: str,
        partitions: int,
        group: str,
        max_backlog: int,
        refresh_s: float,
        *,
        timeout_s: float = TIMEOUT_S,
        stale_s: float = MAX_STALE_S,
    ) -> None:
        self._redis = redis
        self._streams = wire.partition_streams(stream, partitions)
        self._group = group
        self._max_backlog = max_backlog
        self._refresh_s = refresh_s
        self._timeout_s = timeout_s
        self._stale_s = max(stale_s, refresh_s)
        self._lock = asyncio.Lock()
        self._current: Observation | None = None  # the latest good read
        self._previous: Observation | None = None  # the good read before it (for the drain rate)
        self._retry_at = 0.0  # monotonic time before which no read is tried after a failure
        self.reads = 0  # Redis round trips so far (what "once per refresh" is measured by)
        self.failed_reads = 0  # in a row; 0 after a good read

    async def check(self) -> None:
        """Raise Overloaded when the backlog is above the limit or unknown; no-op with maxBacklog 0."""
        if self._max_backlog <= 0:
            return
        obs = await self._observation()
        if obs is None:
            raise Overloaded(self._refresh_s, BACKLOG_UNKNOWN)
        excess = backlog_of(obs) - self._max_backlog
        if excess > 0:
            drain = drain_seconds(excess, self._previous, obs)
            retry = UNKNOWN_RATE_RETRY_S if drain is None else drain
            raise Overloaded(min(max(retry, self._refresh_s), MAX_RETRY_S), BACKLOG)

    def _usable(self) -> Observation | None:
        """The latest good read unless older than the staleness bound."""
        obs = self._current
        return obs if obs is not None and time.monotonic() - obs.at < self._stale_s else None

    def _due(self) -> bool:
        """A read is due once the good one is a refresh interval old, and not before a failure's backoff."""
        now = time.monotonic()
        obs = self._current
        return (obs is None or now - obs.at >= self._refresh_s) and now >= self._retry_at

    async def _observation(self) -> Observation | None:
        """The latest good read, read again when due (concurrent callers share the read; those that
        hold a usable value do not wait for it); None when none is usable."""
        if self._due() and not (self._lock.locked() and self._usable() is not None):
            async with self._lock:
                if self._due():
                    await self._refresh()
        return self._usable()

    async def _refresh(self) -> None:
        obs = await self._read()
        if obs.error is None:
            self._previous, self._current, self.failed_reads = self._current, obs, 0
            return
        delay = min(RETRY_BACKOFF.compute(self.failed_reads), self._refresh_s)
        self.failed_reads += 1
        self._retry_at = obs.at + delay
        if self.failed_reads == 1:  # not once per retry while Redis is away
            log.warning("cannot read the backlog of %s: %s", self._streams[0], obs.error)

    async def _read(self) -> Observation:
        """Stamped when the answer arrives, so a slow read (Redis away, retries) is not stale at birth."""
        self.reads += 1
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._redis.pipeline(transaction=False) as pipe:
                    add_reads(pipe, self._streams)
                    replies = await pipe.execute(raise_on_error=False)
        except (TimeoutError, OSError, redis.RedisError) as exc:
            return Observation(at=time.monotonic(), error=f"{type(exc).__name__}: {exc}")
        return from_pipeline(time.monotonic(), self._group, self._streams, replies)
