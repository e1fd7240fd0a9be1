"""Per-user order across workers: each partition is consumed by one worker at a time, under a lease.

Every worker heartbeats into a registry (a sorted set scored by expiry) and computes the same target
assignment from it: rendezvous hashing of partitions over the live workers, so a worker that joins or
leaves moves only the partitions it wins or held. A worker takes a partition only when its lease key
is free (``SET NX PX``), renews it well inside its TTL, and releases it (after its in-flight work has
committed) when the assignment moves it elsewhere or it stops. A worker that dies simply stops
renewing; its leases expire and the partitions' new owners take them. The lease key lives in the
partition's hash slot (``wire.lease_key``), the registry (``wire.registry_key``) in its own.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..connection import DELETE_IF_HELD
from ..wire import lease_key, registry_key

# Renews a lease only while this worker holds it: after a pause longer than the TTL another worker
# may own it, and must not lose it to a late renewal (nor to a late release: ``DELETE_IF_HELD``).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def owner(partition: str, workers: Iterable[str]) -> str | None:
    """The worker that should consume ``partition``: the highest rendezvous score (ties by name).

    The score must behave like a random draw per (worker, partition) pair. CRC-32 does not: it is
    linear, so workers whose names share a pattern (pods of one ReplicaSet) won whole sets of
    partitions together and left others idle. BLAKE2b does.
    """
    best: tuple[int, str] | None = None
    for worker in workers:
        digest = hashlib.blake2b(f"{worker}\0{partition}".encode(), digest_size=8).digest()
        score = (int.from_bytes(digest, "big"), worker)
        if best is None or score > best:
            best = score
    return None if best is None else best[1]


def assignment(partitions: Sequence[str], workers: Iterable[str], me: str) -> set[str]:
    """The partitions ``me`` should hold when ``workers`` (including ``me``) are alive."""
    everyone = set(workers) | {me}
    return {p for p in partitions if owner(p, everyone) == me}


@dataclass
class Leases:
    """One worker's view of the registry and its leases on ``partitions`` (keys of partition streams)."""

    redis: Any  # redis.asyncio.Redis or RedisCluster
    stream: str
    partitions: Sequence[str]
    me: str
    ttl_ms: int

    async def heartbeat(self) -> list[str]:
        """Say this worker is alive for one TTL; return the live workers (expired ones are dropped)."""
        now = int(time.time() * 1000)
        key = registry_key(self.stream)
        await self.redis.zadd(key, {self.me: now + self.ttl_ms})
        await self.redis.zremrangebyscore(key, "-inf", now)
        return [m.decode() if isinstance(m, bytes) else str(m) for m in await self.redis.zrange(key, 0, -1)]

    async def acquire(self, partition: str) -> bool:
        return bool(await self.redis.set(lease_key(partition), self.me, nx=True, px=self.ttl_ms))

    async def renew(self, partition: str) -> bool:
        """False when the lease is no longer this worker's (expired, or taken after a long pause)."""
        return bool(await self.redis.eval(_RENEW, 1, lease_key(partition), self.me, self.ttl_ms))

    async def release(self, partition: str) -> None:
        await self.redis.eval(DELETE_IF_HELD, 1, lease_key(partition), self.me)

    async def leave(self) -> None:
        """Drop out of the registry at once, so the others rebalance without waiting for the TTL."""
        await self.redis.zrem(registry_key(self.stream), self.me)
