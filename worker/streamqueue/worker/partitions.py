"""Which partitions this worker consumes, with one ``PartitionRun`` each and a share of the in-flight limit.

Without order, every worker consumes every partition: one blocking read per partition (on a cluster
a read cannot span slots), the most throughput, no order. With per-user order a partition must have
one consumer at a time, so this worker consumes only the partitions whose lease it holds: it
heartbeats, computes the rendezvous assignment of partitions over the live workers, takes the
leases of its partitions when they are free, keeps renewing them (also while a partition drains),
and hands a partition over, drained and released, when the assignment moves it to a newcomer. A
lost lease (a pause longer than its TTL) stops that partition at once: its new holder may already
be answering the same entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial
from typing import Any

from ..aio import cancel
from ..connection import RedisClient, cluster_ready, retry_transient, transient
from ..handlers import Handler
from ..metrics import WorkerMetrics
from ..settings import WorkerSettings
from .cancel import CancelWatch
from .leases import Leases, assignment
from .partition_run import PartitionRun

log = logging.getLogger("streamqueue.worker")


class Partitions:
    """The partition runs of one worker."""

    def __init__(
        self, settings: WorkerSettings, redis: RedisClient, handler: Handler, metrics: WorkerMetrics
    ):
        self.s = settings
        self.redis = redis
        self.handler = handler
        self.metrics = metrics
        self.runs: dict[str, tuple[PartitionRun, asyncio.Task[None]]] = {}
        self.redis_ok = False  # order mode: the last heartbeat answered
        self._leases: Leases | None = None
        self._held: set[str] = set()  # partitions whose lease this worker holds (draining ones too)
        self._leaving: dict[str, asyncio.Task[None]] = {}  # partitions draining before release
        self.cancels = CancelWatch(redis, settings.stream)  # one per worker, for every partition
        runs = self.runs
        metrics.in_flight.set_function(lambda: sum(len(run.inflight) for run, _ in runs.values()))

    @property
    def ready(self) -> bool:
        """Every partition run is reading (in order mode, also: Redis answered the last heartbeat)."""
        runs_ready = all(run.ready for run, _ in self.runs.values())
        if self.s.ordering == "perUser":
            return self.redis_ok and runs_ready
        return bool(self.runs) and runs_ready

    async def until_stopped(self, stop: asyncio.Event) -> None:
        await self._cluster_ready(stop)
        watch = asyncio.create_task(self.cancels.run(), name="streamqueue-cancels")
        keeper = asyncio.create_task(
            self._keep_leases() if self.s.ordering == "perUser" else self._consume_all(),
            name="streamqueue-partitions",
        )
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stopper, keeper], return_when=asyncio.FIRST_COMPLETED)
            failure = keeper.exception() if keeper.done() and not keeper.cancelled() else None
        finally:
            await self._wind_down(stopper, keeper, watch)
        if failure is not None:
            raise RuntimeError("worker partitions failed") from failure

    async def _wind_down(
        self, stopper: asyncio.Task[Any], keeper: asyncio.Task[Any], watch: asyncio.Task[Any]
    ) -> None:
        """Stop the keeper, drain the runs, release the leases, then stop the cancel watch: the last
        whatever the steps before it raised (a release refused with NOPERM left it running before)."""
        try:
            await cancel(stopper, keeper)
            await asyncio.gather(*(self._stop_run(p) for p in list(self.runs) if p not in self._leaving))
            await self._leave()
        finally:
            await cancel(watch)

    async def _cluster_ready(self, stop: asyncio.Event) -> None:
        """A cluster client learns the slot map once, before the runs use it."""

        def unreachable(exc: Exception, delay: float) -> None:
            log.warning("Redis Cluster unreachable (%s); retrying in %.2fs", exc, delay)

        await cluster_ready(self.redis, unreachable, stop=stop)

    def _start_run(self, partition: str, share: int, *, takeover: bool = False) -> None:
        """``share``: how many partitions this worker consumes now; each gets that part of its concurrency."""
        run = PartitionRun(
            self.s, self.redis, self.handler, self.metrics,
            stream=partition, concurrency=max(1, self.s.concurrency // share), takeover=takeover,
            cancels=self.cancels,
        )  # fmt: skip
        task = asyncio.create_task(run.until_stopped(), name=f"streamqueue-run {partition}")
        self.runs[partition] = (run, task)

    async def _stop_run(self, partition: str) -> None:
        """Drain the partition (grace period, hand-back) and forget it."""
        run, task = self.runs[partition]
        run.stop.set()
        with contextlib.suppress(Exception):  # a run that failed by itself is reported by _check_runs
            await task
        self.runs.pop(partition, None)

    def _check_runs(self) -> None:
        """A run that ended by itself failed: the worker stops (and its pod restarts)."""
        for partition, (run, task) in list(self.runs.items()):
            if task.done() and not run.stop.is_set():
                raise RuntimeError(f"the run of {partition} ended") from task.exception()

    async def _consume_all(self) -> None:
        for partition in self.s.partition_streams:
            self._start_run(partition, share=self.s.partitions)
        await asyncio.wait([task for _, task in self.runs.values()], return_when=asyncio.FIRST_COMPLETED)
        self._check_runs()

    # ---- per-user order: leases ------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        s = self.s
        leases = self._leases = Leases(self.redis, s.stream, s.partition_streams, s.consumer, s.lease_ttl_ms)
        while True:
            await retry_transient(partial(self._upkeep, leases), self._upkeep_failed)
            self.redis_ok = True
            await asyncio.sleep(s.lease_ttl_ms / 3000)

    async def _upkeep(self, leases: Leases) -> None:
        """One round: heartbeat, renew what is held, hand over what moved away, take what is ours."""
        self._check_runs()
        live = await leases.heartbeat()
        await self._renew(leases)
        target = assignment(self.s.partition_streams, live, self.s.consumer)
        for partition in self._held - target - self._leaving.keys():
            self._leave_partition(partition, release=True)
        for partition in target - self._held - self.runs.keys():
            if await leases.acquire(partition):
                log.info("took the lease of %s", partition)
                self._held.add(partition)
                self._start_run(partition, share=len(target), takeover=True)

    def _upkeep_failed(self, exc: Exception, delay: float) -> None:
        self.redis_ok = False
        log.warning("lease upkeep: Redis unreachable (%s); retrying in %.2fs", exc, delay)

    async def _renew(self, leases: Leases) -> None:
        """Renew every lease held, draining ones included; a lost one stops its partition now."""
        for partition in list(self._held):
            if not await leases.renew(partition):
                log.error("lost the lease of %s (paused past its TTL?): stopping it", partition)
                self._held.discard(partition)
                if partition not in self._leaving:
                    self._leave_partition(partition, release=False)

    def _leave_partition(self, partition: str, *, release: bool) -> None:
        """Drain ``partition`` in the background (leases keep being renewed meanwhile), then release
        its lease if it is still ours."""

        async def leave() -> None:
            await self._stop_run(partition)
            if release and self._leases is not None and partition in self._held:
                self._held.discard(partition)
                await self._leases.release(partition)
            self._leaving.pop(partition, None)

        log.info("handing %s over", partition)
        self._leaving[partition] = asyncio.create_task(leave(), name=f"streamqueue-leave {partition}")

    async def _leave(self) -> None:
        """Stopped and drained: release every lease and leave the registry, so others take over now."""
        await asyncio.gather(*self._leaving.values(), return_exceptions=True)
        if self._leases is None:
            return
        try:
            for partition in list(self._held):
                await self._leases.release(partition)
            await self._leases.leave()
        except Exception as exc:  # the worker stops anyway: its leases lapse after their TTL
            level = logging.WARNING if transient(exc) else logging.ERROR  # an ERROR: e.g. the ACL lacks +eval
            log.log(level, "could not release leases (they lapse after %d ms): %s", self.s.lease_ttl_ms, exc)
