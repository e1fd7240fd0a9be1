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

Queues at rest (nothing to decide until their first message, ``scaler.Rest``) are not checked by
their own loops but by one ``RestSweep`` per Redis: every ``--rest-check-seconds`` (sub-second) one
script call per ``MAX_BATCH_QUEUES`` resting queues (``rest_check.not_idle``) names the queues whose
group is no longer idle, and only those wake. Checked by its own loop on the poll tick, each resting
queue cost a wake-up, a future and two of redis-py's reply reads every poll, all in the same burst,
and a first message waited up to a whole poll interval for that tick: at 2,000 queues the wake-up
took 1.1 s at the median and 1.7 s at most.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from streamqueue.connection import RedisClient, RedisConnection, connect_any

from .rest_check import not_idle

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


@dataclass(eq=False)
class RestWatch:
    """A queue at rest, checked by its Redis's sweep: ``woken`` is set (and the watch dropped) once
    the group of any of its partitions ``streams`` is not idle, or a sweep fails."""

    streams: tuple[str, ...]
    group: str
    woken: asyncio.Event = field(default_factory=asyncio.Event)


class RestSweep:
    """Checks every queue at rest on one Redis each ``interval`` seconds (see the module doc).

    A connection failure or an error reply wakes every queue of that batch: their full polls report
    the error, as their own checks would have. The task runs from the first watch until ``aclose``.
    """

    def __init__(self, client: RedisClient, interval: float, cluster: bool) -> None:
        self.client, self.interval, self.cluster = client, interval, cluster
        self._watches: dict[RestWatch, None] = {}  # an insertion-ordered set
        self._task: asyncio.Task[None] | None = None

    def watch(self, streams: tuple[str, ...], group: str) -> RestWatch:
        watch = RestWatch(streams, group)
        self._watches[watch] = None
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return watch

    def unwatch(self, watch: RestWatch) -> None:
        self._watches.pop(watch, None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(until_next_tick(self.interval, loop.time()))
            await self.sweep()

    async def sweep(self) -> None:
        """Check every watched queue once, ``MAX_BATCH_QUEUES`` per call; wake those not idle."""
        watches = list(self._watches)
        for start in range(0, len(watches), MAX_BATCH_QUEUES):
            batch = watches[start : start + MAX_BATCH_QUEUES]
            owners = [watch for watch in batch for _ in watch.streams]
            checks = [(stream, watch.group) for watch in batch for stream in watch.streams]
            try:
                woken = {owners[i] for i in await not_idle(self.client, checks, self.cluster)}
            except (redis.RedisError, OSError):
                woken = set(batch)
            for watch in woken:
                self.unwatch(watch)
                watch.woken.set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class Shared:
    """A client (and its batching) some queues share; ``users`` counts the queues holding it."""

    connection: RedisConnection
    pipeline: SharedPipeline
    sweep: RestSweep
    users: int = field(default=0)
    # Held around a queue's own commands on ``client`` (see MAX_DIRECT_USERS).
    direct: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_DIRECT_USERS))

    @property
    def client(self) -> RedisClient:
        return self.pipeline.client


class RedisHub:
    """The shared clients, by dialled connection; a client closes when its last queue lets it go.
    ``rest_check_seconds``: the interval of their sweeps of the queues at rest."""

    def __init__(self, rest_check_seconds: float) -> None:
        self.rest_check_seconds = rest_check_seconds
        self._shared: dict[RedisConnection, Shared] = {}

    def acquire(self, connection: RedisConnection) -> Shared:
        shared = self._shared.get(connection)
        if shared is None:
            client = connect_any(connection)
            sweep = RestSweep(client, self.rest_check_seconds, connection.cluster)
            shared = Shared(connection, SharedPipeline(client), sweep)
            self._shared[connection] = shared
        shared.users += 1
        return shared

    async def release(self, shared: Shared) -> None:
        shared.users -= 1
        if shared.users == 0 and self._shared.get(shared.connection) is shared:
            del self._shared[shared.connection]
            await shared.sweep.aclose()
            await shared.pipeline.aclose()
