"""Batched sends: the XADDs of requests sent in the same loop turn go to Redis as one pipeline."""

from __future__ import annotations

import asyncio

from redis.typing import EncodableT, FieldT

from ..connection import RedisClient


class BatchedSends:
    """Requests sent in the same loop turn share one round trip: their XADDs go as one pipeline.

    1,000 requests started at once cost one pipeline instead of 1,000 commands (redis-py spends far
    more time per command than Redis does). Each caller still gets its own entry id, or its own error.
    ``maxlen`` trims each stream (MAXLEN ~) on every XADD; ``commands`` bounds the connections used.
    """

    def __init__(self, redis: RedisClient, commands: asyncio.Semaphore, maxlen: int | None) -> None:
        self._redis = redis
        self._commands = commands
        self._maxlen = maxlen
        self._queue: list[tuple[str, dict[FieldT, EncodableT], asyncio.Future[str]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def add(self, key: str, fields: dict[FieldT, EncodableT]) -> str:
        """XADD ``fields`` to stream ``key`` with the other sends of this loop turn; its entry id."""
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.append((key, fields, done))
        if len(self._queue) == 1:  # its first step runs after this loop turn's other sends are queued
            task = asyncio.create_task(self._send(), name="streamqueue-send")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await done

    async def finish(self) -> None:
        """Wait for the sends already on the wire (their callers learn their outcome)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _send(self) -> None:
        batch, self._queue = self._queue, []
        maxlen, approximate = self._maxlen, self._maxlen is not None
        try:
            async with self._commands:
                if len(batch) == 1:  # alone: a plain command costs less than a pipeline of one
                    key, fields, _ = batch[0]
                    results = [await self._redis.xadd(key, fields, maxlen=maxlen, approximate=approximate)]
                else:
                    pipe = self._redis.pipeline(transaction=False)
                    for key, fields, _ in batch:
                        pipe.xadd(key, fields, maxlen=maxlen, approximate=approximate)
                    results = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        except BaseException:  # cancelled (the client is closing): so are the sends
            for _, _, done in batch:
                done.cancel()
            raise
        for (_, _, done), result in zip(batch, results, strict=True):
            if done.done():  # its caller gave up (cancelled)
                continue
            if isinstance(result, Exception):
                done.set_exception(result)
            else:
                done.set_result(str(result))
