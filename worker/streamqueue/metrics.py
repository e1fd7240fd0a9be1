"""The worker's Prometheus metrics, on a registry per Worker.

A registry per Worker (not the process-global one) lets tests and the benchmark run several Workers
in one process without their counts mixing; the health server exposes the running worker's registry.

The two metrics updated once per message (processed, handler latency) are plain-number collectors
instead of ``prometheus_client`` metrics: those take a lock on every update and the histogram walks
its buckets in Python, which cost a tenth of a no-op worker's CPU. They are updated only from the
worker's event loop thread; a scrape from another thread reads a snapshot that may be one update
behind, never a torn value.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

# Handlers are I/O-bound calls to model servers: from a millisecond to minutes.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class LoopCounter:
    """A counter for the per-message path; exposed as ``<name>_total`` like a ``Counter``."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0.0
        registry.register(self)

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} can only increase, got {amount}")
        self.value += amount

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, value=self.value)]


class LoopHistogram:
    """A histogram for the per-message path: one C bisect and two additions per observation."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        registry.register(self)

    def observe(self, seconds: float) -> None:
        # Bucket i counts values <= bounds[i] (Prometheus ``le``); bisect_left finds the first such i.
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[Metric]:
        counts, total = list(self.counts), self.sum
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            cumulative.append((_le(bound), running))
        return [HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=total)]


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class WorkerMetrics:
    """Counters a pod's dashboards and alerts need: throughput, failures, dead letters, reclaims."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.processed = LoopCounter(
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
        self.expired = Counter(
            "streamqueue_messages_expired",
            "Entries answered with an expired reply instead of the handler, by the limit they were past",
            ["reason"],
            registry=r,
        )
        self.dead_letters_trimmed = Counter(
            "streamqueue_dead_letters_trimmed",
            "Dead letters removed by the dead-letter stream's MAXLEN (deadLetterMaxLen) to make room",
            registry=r,
        )
        self.reclaimed = Counter(
            "streamqueue_messages_reclaimed", "Idle pending entries taken over with XAUTOCLAIM", registry=r
        )
        self.handler_latency = LoopHistogram(
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
        # Model-API limits (streamqueue.limits): counted by the worker's one poller, not per call, so
        # rate() of the wait is the share of time this worker's model calls were held back.
        self.limit_wait = Counter(
            "streamqueue_model_limit_wait_seconds",
            "Seconds this worker's model calls waited for a shared limit, by the limit that bound",
            ["limit"],
            registry=r,
        )
        self.limit_pauses = Counter(
            "streamqueue_model_limit_pauses",
            "429 answers (Retry-After) that paused every worker of the queue",
            registry=r,
        )
