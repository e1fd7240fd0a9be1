"""Refuse new requests while the queue's backlog (lag + pending) is above ``maxBacklog``.

Stub of the public interface (issue 22's contract); the implementation follows.
"""

from __future__ import annotations

from streamqueue.connection import RedisClient


class Overloaded(Exception):
    """The queue is too far behind (or Redis cannot tell): the app answers 503 with Retry-After."""

    def __init__(self, retry_after_s: float, reason: str = "backlog") -> None:
        super().__init__(f"overloaded ({reason}), retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s
        self.reason = reason


class Backlog:
    def __init__(
        self, redis: RedisClient, stream: str, partitions: int, group: str, max_backlog: int, refresh_s: float
    ) -> None:
        self._redis = redis

    async def check(self) -> None:
        """Raise Overloaded when the backlog is above the limit; one XINFO read per refresh interval."""
        raise NotImplementedError
