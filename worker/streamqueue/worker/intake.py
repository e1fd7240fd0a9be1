"""A partition run's intake: fills the free slots with entries from Redis (new ones, or idle pending
ones when a reclaim scan is due) and keeps the claims of the entries in flight fresh."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from ..connection import RedisClient, group_missing, retry_transient, transient
from ..metrics import WorkerMetrics
from ..settings import WorkerSettings
from .fairness import FairPending, FairQueue
from .inflight import InFlight
from .reclaim import Delivery, PendingOwnership

log = logging.getLogger("streamqueue.worker")


class Intake:
    """Reads and reclaims for one partition stream, never holding more than its free slots."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: RedisClient,
        metrics: WorkerMetrics,
        *,
        stream: str,
        inflight: InFlight,
        start: Callable[[Delivery], None],
        takeover: bool,
    ) -> None:
        """``start`` runs each entry taken (its slot taken). ``takeover``: everything pending belongs
        to a previous holder of the partition that is gone; the first reclaim scan takes it all, in
        order, before any new entry is read."""
        s = settings
        self.s = s
        self.stream = stream
        self.redis = redis
        self.metrics = metrics
        self.inflight = inflight
        self._start = start
        self._takeover = takeover
        self.ready = False  # the group exists and Redis answered the last read
        self.reading = False  # an XREADGROUP/XAUTOCLAIM is on the wire
        self._group_ready = False
        self._reclaim_due = 0.0  # scan once at start: a restarted pod's orphans should not wait
        self.fair: FairQueue | None = None  # fairness: its own intake task moves entries into it
        if s.fairness == "perUser":
            self.fair = FairQueue(redis, stream, s.group, block_ms=s.block_ms)
            self.pending: PendingOwnership = FairPending(redis, stream, s.group, s.consumer, s.claim_idle_ms)
        else:
            self.pending = PendingOwnership(redis, stream, s.group, s.consumer, s.claim_idle_ms)

    async def run(self, stop: asyncio.Event) -> None:
        """Fill free slots until ``stop``, waiting out Redis outages (the run is not ready meanwhile)."""
        while not stop.is_set():
            entries = await retry_transient(self._take, self._redis_down, stop=stop)
            if entries is None:
                return
            self.ready = True
            for entry in entries:
                self._start(entry)

    async def _take(self) -> list[Delivery]:
        """One batch for the free slots (taken for it): idle pending entries when a reclaim scan is
        due, otherwise new ones.

        One loop does both so reclaiming never starves behind a reader that holds every free slot
        while it blocks, and the in-flight limit holds exactly. A group Redis lost is created again.
        """
        if not self._group_ready:
            await self._ensure_group()
            self._group_ready = True
        slots = self.inflight.slots
        n = await slots.take(self.s.batch_size)
        self.reading = True
        try:
            if time.monotonic() >= self._reclaim_due:
                entries = await self._reclaim(n)
            else:
                entries = await self._read_new(n)
            await self.inflight.check_cancels(entries)
        except BaseException as exc:
            slots.give(n)
            if not group_missing(exc):
                raise
            log.warning("group %s on %s is gone (Redis restarted?); recreating", self.s.group, self.stream)
            self._group_ready = False
            return []
        finally:
            self.reading = False
        slots.give(n - len(entries))
        return entries

    async def renew_claims(self) -> None:
        """Keep the entries in flight from looking idle, so no other worker reclaims a long handler's."""
        while True:
            await asyncio.sleep(self.s.renew_interval_s)
            if not self.inflight.ids:
                continue
            try:
                await self.pending.renew(list(self.inflight.ids))
            except Exception as exc:
                if transient(exc):
                    log.warning("claim renewal failed, Redis unreachable: %s", exc)
                elif not group_missing(exc):
                    raise
                # Redis lost the group (restart without persistence): nothing of ours is pending any
                # more; the intake loop recreates the group.

    async def _reclaim(self, count: int) -> list[Delivery]:
        """Up to ``count`` idle pending entries; the next scan is due a while after this one went
        round the whole list."""
        min_idle = 0 if self._takeover else None
        entries, wrapped = await self.pending.claim(count, mine=self.inflight.ids, min_idle_ms=min_idle)
        if entries:
            self.metrics.reclaimed.inc(len(entries))
            log.info(
                "reclaimed %d idle entries (%s, delivery %d, ...)",
                len(entries), entries[0].entry_id, entries[0].deliveries,
            )  # fmt: skip
        if wrapped:
            self._takeover = False
            self._reclaim_due = time.monotonic() + self._reclaim_interval_s
        return entries

    @property
    def _reclaim_interval_s(self) -> float:
        """Scan the pending list a few times per claim idle period (at most every 5 s)."""
        return min(max(self.s.claim_idle_ms / 2000, 0.05), 5.0)

    async def _read_new(self, count: int) -> list[Delivery]:
        s = self.s
        if self.fair is not None:
            return await self.fair.take(count, s.consumer)
        # RESP2 reply with decoded text: [[stream, [(id, {field: value}), ...]]] or None on timeout.
        reply: Any = await self.redis.xreadgroup(
            s.group, s.consumer, {self.stream: ">"}, count=count, block=s.block_ms
        )
        return [Delivery(i, f, 1) for _, stream_entries in reply or [] for i, f in stream_entries]

    async def _ensure_group(self) -> None:
        """Create the group at ``group_start_id``: 0 serves entries sent before the group existed,
        $ adopts a stream without replaying its history."""
        try:
            await self.redis.xgroup_create(self.stream, self.s.group, id=self.s.group_start_id, mkstream=True)
            log.info("created group %s on %s", self.s.group, self.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _redis_down(self, exc: Exception, delay: float) -> None:
        self.ready = False
        self.metrics.redis_errors.inc()
        log.warning("Redis unreachable (%s: %s); retrying in %.2fs", type(exc).__name__, exc, delay)
