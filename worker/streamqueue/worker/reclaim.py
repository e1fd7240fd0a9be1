"""Pending-entry ownership: taking over idle entries, keeping our own, handing them back.

A consumer that dies leaves its entries in the group's pending list. Every worker scans that list with
XAUTOCLAIM from a kept cursor (so one scan visits every entry, not just the oldest page) and takes
entries idle past ``claim_idle_ms``. A handler that runs longer than that must look alive, so in-flight
entries are re-claimed with ``XCLAIM ... JUSTID`` (resets idle, does not count a delivery). At shutdown
the worker hands what it still owns back by marking it idle, so others take it over at once.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ..connection import RedisClient

log = logging.getLogger(__name__)
# XPENDING/XCLAIM argument lists are split so one call never carries an unbounded id list.
_ID_CHUNK = 1000
# How many of our own pending entries are released at shutdown (more than any concurrency setting).
_RELEASE_LIMIT = 20_000


@dataclass(frozen=True)
class Delivery:
    """An entry delivered to this consumer, by XREADGROUP or by a claim, and how often so far."""

    entry_id: str
    fields: dict[str, str]
    deliveries: int


class PendingOwnership:
    """XAUTOCLAIM with a kept cursor, claim renewal and release for one consumer."""

    def __init__(self, redis: RedisClient, stream: str, group: str, consumer: str, claim_idle_ms: int):
        self._redis = redis
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self._claim_idle_ms = claim_idle_ms
        self._cursor = "0-0"

    async def claim(
        self, count: int, mine: Collection[str], min_idle_ms: int | None = None
    ) -> tuple[list[Delivery], bool]:
        """One XAUTOCLAIM step of at most ``count`` entries; True once the scan has wrapped around.

        ``min_idle_ms`` overrides the claim idle time (0 takes everything pending: a partition whose
        lease this worker just took has no other live consumer).
        Entries deleted from the stream while pending are dropped from the pending list (and
        acknowledged, for servers that report them without removing them). Entries in ``mine`` are
        already being handled here and are not started twice.
        """
        cursor, entries, *rest = await self._redis.xautoclaim(
            self._stream,
            self._group,
            self._consumer,
            self._claim_idle_ms if min_idle_ms is None else min_idle_ms,
            start_id=self._cursor,
            count=count,
        )
        self._cursor = cursor
        deleted = list(rest[0]) if rest else []
        deleted += [entry_id for entry_id, fields in entries if fields is None]
        if deleted:
            await self._redis.xack(self._stream, self._group, *deleted)
            log.warning(
                "pending entries were deleted from %s before being handled: %s", self._stream, deleted
            )
        live = [(i, f) for i, f in entries if f is not None and i not in mine]
        counts = await self._delivery_counts([i for i, _ in live])
        return [Delivery(i, f, counts.get(i, 1)) for i, f in live], cursor == "0-0"

    async def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        if not ids:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(self._stream, self._group, min=entry_id, max=entry_id, count=1)
        counts = {}
        for rows in await pipe.execute():
            for row in rows:
                counts[row["message_id"]] = int(row["times_delivered"])
        return counts

    async def renew(self, ids: Collection[str]) -> None:
        """Reset the idle time of entries still being handled, so nobody reclaims them."""
        await self._xclaim_justid(list(ids), idle_ms=None)

    async def release_all(self) -> int:
        """Mark every entry this consumer still owns as idle, so another worker takes it over now."""
        rows = await self._redis.xpending_range(
            self._stream, self._group, min="-", max="+", count=_RELEASE_LIMIT, consumername=self._consumer
        )
        ids = [str(row["message_id"]) for row in rows]
        await self._xclaim_justid(ids, idle_ms=self._claim_idle_ms)
        return len(ids)

    async def _xclaim_justid(self, ids: list[str], idle_ms: int | None) -> None:
        for start in range(0, len(ids), _ID_CHUNK):
            chunk: list[Any] = ids[start : start + _ID_CHUNK]
            await self._redis.xclaim(
                self._stream,
                self._group,
                self._consumer,
                min_idle_time=0,
                message_ids=chunk,
                idle=idle_ms,
                justid=True,
            )
