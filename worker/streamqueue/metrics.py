"""The worker's Prometheus metrics, on a registry per Worker.

A registry per Worker (not the process-global one) lets tests and the benchmark run several Workers
in one process without their counts mixing; the health server exposes the running worker's registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Handlers are I/O-bound calls to model servers: from a millisecond to minutes.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class WorkerMetrics:
    """Counters a pod's dashboards and alerts need: throughput, failures, dead letters, reclaims."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.processed = Counter(
            "streamqueue_messages_processed", "Messages answered and acknowledged", registry=r
        )
        self.failed = Counter(
            "streamqueue_handler_failures", "Handler calls that raised (the entry stays pending)", registry=r
        )
        self.dead_lettered = Counter(
            "streamqueue_messages_dead_lettered",
            "Entries moved to the dead-letter stream, by reason",
            ["reason"],
            registry=r,
        )
        self.reclaimed = Counter(
            "streamqueue_messages_reclaimed", "Idle pending entries taken over with XAUTOCLAIM", registry=r
        )
        self.handler_latency = Histogram(
            "streamqueue_handler_duration_seconds",
            "Time spent in the handler per message",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("streamqueue_messages_in_flight", "Messages being handled now", registry=r)
        self.redis_errors = Counter(
            "streamqueue_redis_errors",
            "Redis connection errors seen (each followed by a backoff)",
            registry=r,
        )
