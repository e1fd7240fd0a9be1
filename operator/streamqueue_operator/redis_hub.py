"""One Redis client per Redis for all the queues on it, and one pipeline per poll tick across them.

With a client per queue, 2,000 queues cost 2,000 connections and 2,000 pipelines a second, each
with redis-py's fixed cost per pipeline (connection checkout, retry wrapper, timeout, syscalls).
Here the queues whose dialled connection (``redis_access.dialled``: URL, user, password, TLS, CA,
cluster) is equal share one client, kept while any of them uses it, and the commands they send
within ``BATCH_WINDOW_SECONDS`` of each other go out as one pipeline (``SharedPipeline``). The
queues' loops wake on the same tick (``until_next_tick``), so each tick costs one round trip per
Redis (more only past ``MAX_BATCH_QUEUES`` queues) instead of one per queue.

A connection failure fails the whole batch: every queue in it sees the error, as its own pipeline
would have; a command's error reply goes to the queue that sent it only.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from streamqueue.connection import RedisClient, RedisConnection, connect_any

# Long enough to gather every queue woken by the same tick, short enough not to matter to reaction.
BATCH_WINDOW_SECONDS = 0.01
# Queues per pipeline: bounds one reply's parsing time (the event loop is busy meanwhile).
MAX_BATCH_QUEUES = 500
# Connections a shared client opens for the queues' own commands (housekeeping, pod ranking): their
# work falls due on the same ticks, and one connection each could exhaust the server's maxclients.
MAX_DIRECT_USERS = 8

# Adds one queue's commands to a pipeline; its replies come back in the same order.
Commands = Callable[[Any], None]
# Sends a queue's commands and returns their replies: its own pipeline, or SharedPipeline.execute.
Run = Callable[[Commands], Awaitable[list[Any]]]


def until_next_tick(interval: float, now: float) -> float:
    """Seconds from ``now`` to the next multiple of ``interval``: loops with the same interval wake
    together, so their commands share a pipeline."""
    return interval - math.fmod(now, interval) if interval > 0 else 0.0


class SharedPipeline:
    """Gathers the commands of many queues into one pipeline per window (see the module doc)."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self._pending: list[tuple[Commands, asyncio.Future[list[Any]]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def execute(self, commands: Commands) -> list[Any]:
        """The replies to ``commands`` (errors as exception values); raises a connection failure."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((commands, future))
        if len(self._pending) >= MAX_BATCH_QUEUES:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(BATCH_WINDOW_SECONDS, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Commands, asyncio.Future[list[Any]]]]) -> None:
        spans = []
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for commands, _ in batch:
                    start = len(pipe)
                    commands(pipe)
                    spans.append((start, len(pipe)))
                replies = await pipe.execute(raise_on_error=False)
        except (redis.RedisError, OSError) as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        for (start, end), (_, future) in zip(spans, batch, strict=True):
            if not future.done():
                future.set_result(replies[start:end])

    async def aclose(self) -> None:
        for task in list(self._sending):
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)
        await self.client.aclose()


@dataclass
class Shared:
    """A client (and its batching) some queues share; ``users`` counts the queues holding it."""

    connection: RedisConnection
    pipeline: SharedPipeline
    users: int = field(default=0)
    # Held around a queue's own commands on ``client`` (see MAX_DIRECT_USERS).
    direct: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_DIRECT_USERS))

    @property
    def client(self) -> RedisClient:
        return self.pipeline.client


class RedisHub:
    """The shared clients, by dialled connection; a client closes when its last queue lets it go."""

    def __init__(self) -> None:
        self._shared: dict[RedisConnection, Shared] = {}

    def acquire(self, connection: RedisConnection) -> Shared:
        shared = self._shared.get(connection)
        if shared is None:
            shared = Shared(connection, SharedPipeline(connect_any(connection)))
            self._shared[connection] = shared
        shared.users += 1
        return shared

    async def release(self, shared: Shared) -> None:
        shared.users -= 1
        if shared.users == 0 and self._shared.get(shared.connection) is shared:
            del self._shared[shared.connection]
            await shared.pipeline.aclose()
