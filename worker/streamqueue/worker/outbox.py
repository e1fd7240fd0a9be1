"""Writes that finish entries — replies, dead letters — sent together with their XACK.

At-least-once hinges on order: an entry is acknowledged only in the same pipeline as, and after, the
writes that answer it. Finished entries queue here and one flusher sends everything queued so far in a
single round trip, so a busy worker pays one RTT for many replies while an idle one pays no delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

from ..metrics import WorkerMetrics
from .backoff import Backoff

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamWrite:
    """One XADD; ``maxlen`` trims approximately and ``ttl_s`` (re)sets the key's idle expiry."""

    key: str
    fields: dict[str, str]
    maxlen: int | None = None
    ttl_s: int | None = None


@dataclass
class _Finished:
    entry_id: str
    writes: list[StreamWrite]
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Outbox:
    """Batches finished entries into pipelines of XADD (+ EXPIRE) then one XACK."""

    def __init__(self, redis: aioredis.Redis, stream: str, group: str, metrics: WorkerMetrics) -> None:
        self._redis = redis
        self._stream = stream
        self._group = group
        self._metrics = metrics
        self._queue: list[_Finished] = []
        self._wake = asyncio.Event()
        self._abandon = asyncio.Event()

    async def finish(self, entry_id: str, writes: list[StreamWrite]) -> None:
        """Return once ``writes`` are stored and ``entry_id`` is acknowledged.

        Raises ``OutboxAbandoned`` if Redis stayed unreachable until the worker gave up (shutdown
        deadline): the entry then stays pending and another worker reclaims it.
        """
        item = _Finished(entry_id, writes)
        self._queue.append(item)
        self._wake.set()
        await item.done

    def abandon(self) -> None:
        """Stop retrying: queued and future entries fail with ``OutboxAbandoned``."""
        self._abandon.set()
        self._wake.set()

    async def run(self) -> None:
        """The flusher: sends whatever is queued, retrying through Redis outages."""
        backoff = Backoff()
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            while batch:
                if self._abandon.is_set():
                    _fail(batch, OutboxAbandoned("Redis unreachable at shutdown; entry left pending"))
                    break
                try:
                    await self._flush(batch)
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    self._metrics.redis_errors.inc()
                    delay = backoff.next_delay()
                    log.warning(
                        "reply/ack pipeline failed (%s); retrying %d entries in %.2fs", exc, len(batch), delay
                    )
                    await _sleep_unless(self._abandon, delay)
                    continue
                except Exception as exc:
                    log.exception("reply/ack pipeline rejected by Redis")
                    _fail(batch, exc)
                    break
                backoff.reset()
                for item in batch:
                    if not item.done.done():
                        item.done.set_result(None)
                break

    async def _flush(self, batch: list[_Finished]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for item in batch:
            for write in item.writes:
                pipe.xadd(write.key, redis_fields(write.fields), maxlen=write.maxlen, approximate=True)
                if write.ttl_s is not None:
                    pipe.expire(write.key, write.ttl_s)
        pipe.xack(self._stream, self._group, *(item.entry_id for item in batch))
        results = await pipe.execute(raise_on_error=False)
        # Connection trouble surfaces as an exception above; a per-command error (a reply key that is
        # not a stream) cannot be retried away, so it is logged and the rest of the batch stands.
        for result in results:
            if isinstance(result, Exception):
                log.error("Redis rejected a reply or dead-letter write: %s", result)


def redis_fields(fields: Mapping[str, str]) -> dict[FieldT, EncodableT]:
    """The same fields, typed as redis-py's XADD wants them."""
    return {name: value for name, value in fields.items()}


class OutboxAbandoned(RuntimeError):
    """The entry's writes were never confirmed; it was not acknowledged."""


def _fail(batch: list[_Finished], exc: BaseException) -> None:
    for item in batch:
        if not item.done.done():
            item.done.set_exception(exc)


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=seconds)
