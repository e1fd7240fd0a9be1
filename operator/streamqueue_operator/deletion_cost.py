"""Which worker pods a scale-down should remove: ``controller.kubernetes.io/pod-deletion-cost``.

The ReplicaSet controller removes pods with the lowest deletion cost first (after unscheduled,
pending and not-Ready ones). A worker's consumer (consumer name = pod name) tells what removing
its pod would cost: entries it holds pending are work in flight that SIGTERM must drain or that
XAUTOCLAIM must later move, and a consumer that read recently is busy. So, before a scale-down,
each pod gets ``pending * 1000 + recency`` (recency 0..999: 999 for a consumer active this
second, 0 for one idle 999 s or more; a pod without a consumer has cost 0; from ``MAX_PENDING``
pending entries on, the int32 maximum we use) and idle pods go first.

A worker consumes every partition of a partitioned queue under one consumer name, so a pod's load
is combined over the partitions (``combine_loads``): its pending entries summed, its most recent read
kept. Pure: ``observe.consumer_loads`` reads ``XINFO CONSUMERS`` of every partition, the scaler reads
the pods, this module computes the annotations, and only pods whose annotation would change are
patched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
RECENCY_SPAN = 1000  # seconds of idle time that still count, and the weight of one pending entry
MAX_PENDING = 2_000_000  # keeps the cost inside int32, as the API requires


@dataclass(frozen=True)
class ConsumerLoad:
    """One consumer of ``XINFO CONSUMERS``: entries it holds, milliseconds since it last read."""

    pending: int
    idle_ms: int

    @classmethod
    def from_reply(cls, consumer: Mapping[Any, Any]) -> tuple[str, ConsumerLoad]:
        def field(key: str) -> Any:
            return consumer.get(key, consumer.get(key.encode()))

        name = field("name")
        name = name.decode() if isinstance(name, bytes) else str(name)
        return name, cls(int(field("pending") or 0), int(field("idle") or 0))


def cost(load: ConsumerLoad | None) -> int:
    """Higher is more expensive to remove: pending entries dominate, recent activity breaks ties."""
    if load is None:
        return 0
    if load.pending >= MAX_PENDING:  # saturated: the most expensive, whatever its recency
        return MAX_PENDING * RECENCY_SPAN + RECENCY_SPAN - 1
    idle_seconds = min(load.idle_ms // 1000, RECENCY_SPAN - 1)
    return load.pending * RECENCY_SPAN + (RECENCY_SPAN - 1 - idle_seconds)


def changes(pods: Mapping[str, str | None], loads: Mapping[str, ConsumerLoad]) -> dict[str, str]:
    """Pod name -> new annotation value, for the pods whose current value (``pods``) differs."""
    wanted = {name: str(cost(loads.get(name))) for name in pods}
    return {name: value for name, value in wanted.items() if pods[name] != value}


def loads_from_reply(reply: Iterable[Mapping[Any, Any]]) -> dict[str, ConsumerLoad]:
    return dict(ConsumerLoad.from_reply(c) for c in reply)


def combine_loads(partitions: Iterable[Mapping[str, ConsumerLoad]]) -> dict[str, ConsumerLoad]:
    """One load per consumer over every partition: pending summed (all of it is work in flight), idle
    the smallest (a pod that read any partition recently is busy)."""
    combined: dict[str, ConsumerLoad] = {}
    for loads in partitions:
        for name, load in loads.items():
            seen = combined.get(name, ConsumerLoad(0, load.idle_ms))
            combined[name] = ConsumerLoad(seen.pending + load.pending, min(seen.idle_ms, load.idle_ms))
    return combined
