"""The gateway's Prometheus metrics, per tier: what each class of customer asked, got and was refused.

A registry per app (not the process-global one), so tests and benchmarks can run several gateways in
one process without their counts mixing; ``/metrics`` serves it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# From a cache-hot echo (milliseconds) to a large model's queue wait (minutes).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# requests_total's outcomes.
OK = "ok"
ERROR = "error"  # the worker answered with an error (dead-lettered, ...)
CANCELLED = "cancelled"  # cancelled by the caller (DELETE, a WebSocket cancel) or a resume grace
DISCONNECTED = "disconnected"  # the caller went away mid-request: the request was cancelled
EXPIRED = "expired"
TIMEOUT = "timeout"

# rejected_total's reasons besides a quota's limit name (quotas.Limit) and Overloaded's
# (backpressure.BACKLOG, backpressure.BACKLOG_UNKNOWN, quotas.UNANSWERED).
REJECTED_AUTH = "auth"
REJECTED_TIER = "unknown_tier"


class GatewayMetrics:
    """Counters and gauges labelled by tier (and model where one is known)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        prefix = "streamqueue_gateway"
        self.requests = Counter(
            f"{prefix}_requests", "Admitted requests by outcome", ["model", "tier", "outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.rejected = Counter(
            f"{prefix}_rejected",
            "Requests refused before the queue: a quota limit, the backlog, Redis not answering, auth",
            ["tier", "reason"], registry=self.registry,
        )  # fmt: skip
        self.ttft = Histogram(
            f"{prefix}_time_to_first_token_seconds", "Admission to the first chunk written to the caller",
            ["model", "tier"], buckets=TTFT_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.tokens = Counter(
            f"{prefix}_tokens", "Tokens debited (reported by the model, else estimated)", ["tier"],
            registry=self.registry,
        )  # fmt: skip
        self.active_streams = Gauge(
            f"{prefix}_active_streams", "Replies being streamed to callers now", ["tier"],
            registry=self.registry,
        )  # fmt: skip
