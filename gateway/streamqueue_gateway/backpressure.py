"""Refuse new requests while the queue's backlog (lag + pending) is above ``maxBacklog``.

The backlog is counted exactly as the operator scales on it (``streamqueue.observation``: a lag Redis
cannot tell is estimated from above, a partition without the group counts its whole stream). Each
gateway process reads it at most once per ``refresh_s`` (one pipelined XINFO round trip, shared by
every request that arrives meanwhile), so checking costs no Redis call per request.

Fail closed: when Redis does not answer within ``timeout_s`` the answer is Overloaded (503) until the
next refresh succeeds; a request is never queued without knowing the queue can take it, and requests
never pile up waiting for Redis.

Retry-After: the time the workers need to bring the backlog back under the limit at the rate they
read entries between the last two reads, within [``refresh_s``, ``MAX_RETRY_S``]; ``UNKNOWN_RATE_RETRY_S``
before a second read or while the workers read nothing.
"""

from __future__ import annotations

import asyncio
import time

import redis
from streamqueue import wire
from streamqueue.connection import RedisClient
from streamqueue.observation import Observation, add_reads, from_pipeline

MAX_RETRY_S = 60.0
UNKNOWN_RATE_RETRY_S = 5.0
TIMEOUT_S = 2.0
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
    ) -> None:
        self._redis = redis
        self._streams = wire.partition_streams(stream, partitions)
        self._group = group
        self._max_backlog = max_backlog
        self._refresh_s = refresh_s
        self._timeout_s = timeout_s
        self._lock = asyncio.Lock()
        self._current: Observation | None = None
        self._previous: Observation | None = None
        self.reads = 0  # Redis round trips so far (what "once per refresh" is measured by)

    async def check(self) -> None:
        """Raise Overloaded when the backlog is above the limit or unknown; no-op with maxBacklog 0."""
        if self._max_backlog <= 0:
            return
        obs = await self._observation()
        if obs.error is not None:
            raise Overloaded(self._refresh_s, BACKLOG_UNKNOWN)
        excess = backlog_of(obs) - self._max_backlog
        if excess > 0:
            drain = drain_seconds(excess, self._previous, obs)
            retry = UNKNOWN_RATE_RETRY_S if drain is None else drain
            raise Overloaded(min(max(retry, self._refresh_s), MAX_RETRY_S), BACKLOG)

    def _fresh(self) -> Observation | None:
        obs = self._current
        return obs if obs is not None and time.monotonic() - obs.at < self._refresh_s else None

    async def _observation(self) -> Observation:
        """The latest read if younger than refresh_s, else a new one; concurrent callers share it."""
        obs = self._fresh()
        if obs is not None:
            return obs
        async with self._lock:
            obs = self._fresh()
            if obs is None:
                obs = await self._read()
                if obs.error is None:
                    self._previous = self._current if self._current and self._current.error is None else None
                self._current = obs
            return obs

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
