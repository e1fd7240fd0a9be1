"""``ModelLimits``, one worker's view of its queue's model-API limits: a poller that grants the local FIFO
of waiting calls in one script round trip each, and the renewal of the granted calls' leases."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .. import wire
from ..aio import wait_set
from ..metrics import WorkerMetrics
from .scripts import DECIDE, PAUSE, RELEASE, RENEW, request_burst

if TYPE_CHECKING:
    from ..connection import RedisClient
    from ..settings import WorkerSettings

log = logging.getLogger(__name__)

CALL_LEASE_MS = 15_000  # a crashed worker's call slots free themselves this long after its last renewal
CONCURRENCY_POLL_MS = 50  # how often a worker re-asks while every slot is taken by another worker
MAX_GRANT = 100  # calls one round trip may start at once


class LimitsUnavailable(RuntimeError):
    """Redis could not be asked whether a model call may start: the call is not made."""


class Call:
    """One model call while it holds its limits: ``async with limits.call() as call`` (``Call(None)``:
    a call that waits for nothing, for a handler built without limits).

    ``report_tokens`` adds the tokens the call used (prompt and completion); they are debited from the
    tokens-per-minute budget when the block ends, whether the call succeeded or not.
    """

    def __init__(self, limits: ModelLimits | None) -> None:
        self._limits = limits
        self.id: str | None = None
        self.tokens = 0

    def report_tokens(self, tokens: int) -> None:
        if tokens < 0:
            raise ValueError(f"tokens used cannot be negative, got {tokens}")
        self.tokens += tokens

    async def __aenter__(self) -> Call:
        if self._limits is not None:
            self.id = await self._limits._acquire()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._limits is not None and self.id is not None:
            await self._limits._release(self.id, self.tokens)


class ModelLimits:
    """The limits of one queue's model calls, as seen from one worker (one Redis client)."""

    def __init__(
        self,
        redis: RedisClient,
        stream: str,
        *,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        concurrent_calls: int | None = None,
        metrics: WorkerMetrics | None = None,
        lease_ms: int = CALL_LEASE_MS,
        poll_ms: int = CONCURRENCY_POLL_MS,
        owns_redis: bool = False,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.rpm = requests_per_minute or 0
        self.tpm = tokens_per_minute or 0
        self.concurrent = concurrent_calls or 0
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.lease_ms = lease_ms
        self.poll_ms = poll_ms
        self._owns_redis = owns_redis
        self._keys = [wire.limits_key(stream), wire.limit_calls_key(stream), wire.limit_bound_key(stream)]
        self._decide = redis.register_script(DECIDE)
        self._release_script = redis.register_script(RELEASE)
        self._pause = redis.register_script(PAUSE)
        self._renew = redis.register_script(RENEW)
        self._prefix = f"{uuid.uuid4().hex[:12]}:"
        self._seq = 0  # call ids are <prefix><seq>: unique per worker, never reused
        self._waiters: deque[asyncio.Future[str]] = deque()
        self._poller: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._released = asyncio.Event()
        self._held: set[str] = set()  # leases of calls in progress here (concurrency limit only)
        self._background: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_settings(cls, settings: WorkerSettings, metrics: WorkerMetrics | None = None) -> ModelLimits:
        """The queue's limits from the worker's settings, on a Redis client of their own.

        Always a ``ModelLimits``, also when no limit is set: a 429 still pauses every worker of the
        queue, at the cost of one Redis round trip per call (shared by the calls that start together).
        """
        from ..connection import connect_any

        return cls(
            connect_any(settings.redis_connection()),
            settings.stream,
            requests_per_minute=settings.model_requests_per_minute,
            tokens_per_minute=settings.model_tokens_per_minute,
            concurrent_calls=settings.model_concurrent_calls,
            metrics=metrics,
            owns_redis=True,
        )

    @property
    def limited(self) -> bool:
        """True when a rate or concurrency limit is set (a 429 pause applies regardless)."""
        return bool(self.rpm or self.tpm or self.concurrent)

    def call(self) -> Call:
        """``async with limits.call() as call``: waits until the call may start, holds it until the end."""
        return Call(self)

    async def pause(self, seconds: float, reason: str = wire.LIMIT_RETRY_AFTER) -> float:
        """Hold back every worker's calls for ``seconds`` (a 429's Retry-After); returns the pause left.

        The queue's pause becomes the later of the one already set and now + ``seconds``.
        """
        if reason not in wire.LIMIT_REASONS:
            raise ValueError(f"reason must be one of {wire.LIMIT_REASONS}, got {reason!r}")
        ms = max(1, math.ceil(seconds * 1000))
        keys = [self._keys[0], self._keys[2]]
        try:
            left = await self._pause(keys=keys, args=[ms, reason, self.tpm, wire.LIMIT_BOUND_TTL_MS])
        except Exception as exc:
            raise LimitsUnavailable(f"model-API limits: cannot pause the queue's calls: {exc!r}") from exc
        self.metrics.limit_pauses.inc()
        log.info("model API paused for every worker of %s: %.1fs (%s)", self.stream, int(left) / 1000, reason)
        return int(left) / 1000

    async def aclose(self) -> None:
        for task in (self._poller, self._renewer):
            if task is not None:
                task.cancel()
        self._fail_waiters(LimitsUnavailable("model-API limits closed"))
        if self._background:
            await asyncio.wait(self._background, timeout=2)
        if self._owns_redis:
            await self.redis.aclose()

    # --- waiting: one poller per ModelLimits serves the local FIFO --------------------------------

    async def _acquire(self) -> str:
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="streamqueue-limits-poller")
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._spawn(self._release(waiter.result(), 0))  # granted just as we were cancelled
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    async def _poll(self) -> None:
        while self._drop_cancelled():
            seq = self._seq
            want = min(len(self._waiters), MAX_GRANT)
            self._released.clear()  # a call ending from here on cuts a concurrency wait short
            try:
                reply = await self._decide(keys=self._keys, args=self._decide_args(want, seq))
            except Exception as exc:  # every waiter must learn it: none may hang or start unlimited
                self._fail_waiters(
                    LimitsUnavailable(f"model-API limits unavailable, the call is not made: {exc!r}")
                )
                log.warning("model-API limits of %s: Redis unavailable: %r", self.stream, exc)
                return
            granted, wait_ms, reason = int(reply[0]), int(reply[1]), str(reply[2])
            self._seq += max(granted, 1)  # the script named the granted calls seq, seq+1, ...
            if granted:
                self._grant([f"{self._prefix}{seq + i}" for i in range(granted)])
            if wait_ms > 0:
                await self._wait(wait_ms, reason)

    def _decide_args(self, want: int, seq: int) -> list[int | str]:
        burst = request_burst(self.rpm) if self.rpm else 1
        return [
            want, self._prefix, seq, self.rpm, burst, self.tpm, self.concurrent,
            self.lease_ms, self.poll_ms, wire.LIMIT_BOUND_TTL_MS,
        ]  # fmt: skip

    def _drop_cancelled(self) -> bool:
        """Forget waiters that gave up; True while some still wait."""
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()
        return bool(self._waiters)

    def _grant(self, ids: list[str]) -> None:
        for call_id in ids:
            if self.concurrent:
                self._held.add(call_id)
            if self._drop_cancelled():
                self._waiters.popleft().set_result(call_id)
            else:  # the waiter left while the script ran: give the slot back
                self._spawn(self._release(call_id, 0))
        if self._held and (self._renewer is None or self._renewer.done()):
            self._renewer = asyncio.create_task(self._renew_leases(), name="streamqueue-limits-renewer")

    async def _wait(self, wait_ms: int, reason: str) -> None:
        started = time.monotonic()
        if reason == wire.LIMIT_CONCURRENT:  # a local call that ends frees a slot: ask again at once
            await wait_set(self._released, wait_ms / 1000)
        else:
            await asyncio.sleep(wait_ms / 1000)
        self.metrics.limit_wait.labels(reason).inc(time.monotonic() - started)

    def _fail_waiters(self, error: Exception) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    # --- calls in progress ------------------------------------------------------------------------

    async def _release(self, call_id: str, tokens: int) -> None:
        """Free the call's slot and debit its tokens; shielded, so a cancelled handler still releases."""
        self._held.discard(call_id)
        self._released.set()
        if not (self.concurrent or (self.tpm and tokens)):
            return
        await asyncio.shield(self._spawn(self._release_now(call_id, tokens)))

    async def _release_now(self, call_id: str, tokens: int) -> None:
        try:
            await self._release_script(keys=self._keys[:2], args=[call_id, tokens, self.tpm])
        except Exception as exc:  # its lease lapses by itself; the tokens go uncounted
            log.warning("model-API limits: could not release call %s (%d tokens): %r", call_id, tokens, exc)

    async def _renew_leases(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease_ms / 3000)
            if not self._held:
                return
            try:
                await self._renew(keys=[self._keys[1]], args=[self.lease_ms, *self._held])
            except Exception as exc:  # retried next round; a lease lapses only after lease_ms
                log.warning("model-API limits: could not renew %d call leases: %r", len(self._held), exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task
