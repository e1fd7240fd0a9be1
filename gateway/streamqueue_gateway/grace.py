"""Resume grace for browser event streams: a dropped stream cancels its request only if no replica
picked it up again within ``resumeGraceSeconds``.

A browser's EventSource reconnects by itself, possibly to another replica, so "the connection
dropped" is not yet "the user left". Each request has a watch key in Redis holding a token of its
current watcher. A replica that serves the stream writes its own token there (``attach``); when its
connection drops it writes a fresh token (``detach``) and, ``grace_s`` later, cancels the request if
that token is still there: any attach meanwhile, on any replica, replaced it. The POST that creates a
request starts it detached, so a request nobody ever watches is cancelled too. A replica that dies
mid-stream or during a grace period leaves no timer behind: its request then runs to its end.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

from streamqueue.connection import DELETE_IF_HELD, RedisClient

log = logging.getLogger(__name__)

# A detached watch key outlives its grace by this much, so the timer still finds it.
_MARGIN_S = 30


class Watches:
    """The watch keys (``<namespace>:watch:<request id>``) and this replica's grace timers."""

    def __init__(self, redis: RedisClient, namespace: str, grace_s: float, ttl_s: int) -> None:
        self._redis = redis
        self._namespace = namespace
        self.grace_s = grace_s
        self._ttl_s = ttl_s
        self._take = redis.register_script(DELETE_IF_HELD)
        self._timers: set[asyncio.Task[None]] = set()

    def key(self, request_id: str) -> str:
        return f"{self._namespace}:watch:{request_id}"

    async def attach(self, request_id: str) -> str:
        """This replica now serves the request's stream: no pending grace timer may cancel it."""
        token = uuid.uuid4().hex
        await self._redis.set(self.key(request_id), token, ex=self._ttl_s)
        return token

    async def detach(self, request_id: str, cancel: Callable[[], Awaitable[None]]) -> None:
        """Nobody watches the request now: ``cancel`` it unless someone attaches within the grace."""
        token = uuid.uuid4().hex
        await self._redis.set(self.key(request_id), token, ex=int(self.grace_s) + _MARGIN_S)
        timer = asyncio.create_task(self._expire(request_id, token, cancel), name="gateway-grace")
        self._timers.add(timer)
        timer.add_done_callback(self._timers.discard)

    async def done(self, request_id: str, token: str) -> None:
        """The stream reached the final entry: the key is not needed any more (unless re-attached)."""
        await self._take(keys=[self.key(request_id)], args=[token])

    async def _expire(self, request_id: str, token: str, cancel: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(self.grace_s)  # the grace itself, not a synchronisation
        try:
            if await self._take(keys=[self.key(request_id)], args=[token]):
                await cancel()
        except Exception as exc:  # Redis away: the request runs to its end instead
            log.warning("resume grace of request %s: %s", request_id, exc)

    async def close(self) -> None:
        """Stop the timers (at shutdown): their requests run to their end."""
        for timer in list(self._timers):
            timer.cancel()
        await asyncio.gather(*self._timers, return_exceptions=True)
