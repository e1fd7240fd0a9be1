"""The worker: one consumer of a queue's group on each partition it consumes, until it is stopped.

``Worker`` is the public face (the CLI and tests run it): it connects, loads the handler and lets
``Partitions`` decide which partition streams to consume, each with a ``PartitionRun`` (read, handle, answer
and acknowledge, reclaim, drain). ``request_stop`` starts the drain of every partition.
"""

from __future__ import annotations

import asyncio
import logging

from ..connection import connect_any
from ..handlers import Handler, close_handler, load_handler
from ..metrics import WorkerMetrics
from ..settings import WorkerSettings
from .partitions import Partitions

log = logging.getLogger("streamqueue.worker")


class Worker:
    """One consumer of a queue's group on each of its partitions; ``await run()`` until ``request_stop()``."""

    def __init__(
        self,
        settings: WorkerSettings,
        handler: Handler | None = None,
        *,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self._given_handler = handler
        self._stop = asyncio.Event()
        self._partitions: Partitions | None = None

    @property
    def ready(self) -> bool:
        """True while the groups exist, Redis answered the last reads, and no stop was requested."""
        return self._partitions is not None and self._partitions.ready and not self._stop.is_set()

    def request_stop(self) -> None:
        """Begin the drain; safe to call from a signal handler running on the worker's loop."""
        self._stop.set()

    async def run(self) -> None:
        s = self.settings
        handler = self._given_handler or load_handler(s.handler, s, metrics=self.metrics)
        redis = connect_any(s.redis_connection(), block_ms=s.block_ms)
        log.info(
            "worker %s starting on %s stream=%s partitions=%d ordering=%s group=%s handler=%s "
            "concurrency=%d batch=%d",
            s.consumer, s.safe_url(), s.stream, s.partitions, s.ordering, s.group,
            s.handler if self._given_handler is None else getattr(handler, "__qualname__", repr(handler)),
            s.concurrency, s.batch_size,
        )  # fmt: skip
        self._partitions = Partitions(s, redis, handler, self.metrics)
        try:
            await self._partitions.until_stopped(self._stop)
        finally:
            self._partitions = None
            if self._given_handler is None:
                await close_handler(handler)
            await redis.aclose()
            log.info("worker %s stopped", s.consumer)
