"""Prometheus metrics, one series per queue (labels: namespace, name)."""

from __future__ import annotations

from typing import Literal

from prometheus_client import Counter, Gauge, start_http_server
from streamqueue import wire

from .decide import PAUSES, Decision, Reason
from .observe import UNKNOWN_LIMIT, Observation

_LABELS = ("namespace", "name")

BACKLOG = Gauge("streamqueue_backlog", "Lag plus pending entries of the queue's group.", _LABELS)
PARTITION_BACKLOG = Gauge(
    "streamqueue_partition_backlog", "Lag plus pending of one partition stream.", (*_LABELS, "partition")
)
PENDING = Gauge("streamqueue_pending", "Delivered but unacknowledged entries.", _LABELS)
LAG = Gauge("streamqueue_lag", "Entries not yet delivered to the group.", _LABELS)
LAG_ESTIMATED = Gauge(
    "streamqueue_lag_estimated", "1 when Redis reported lag as nil and it is estimated.", _LABELS
)
DESIRED = Gauge("streamqueue_desired_replicas", "Replicas the scaler decided on.", _LABELS)
CURRENT = Gauge("streamqueue_current_replicas", "Replicas of the worker Deployment.", _LABELS)
READY = Gauge("streamqueue_ready_replicas", "Ready replicas of the worker Deployment.", _LABELS)
MAX = Gauge("streamqueue_max_replicas", "The queue's scaling.maxReplicas.", _LABELS)
PAUSED = Gauge("streamqueue_paused", "1 while the pause annotations hold the replica count.", _LABELS)
LIMIT_BOUND = Gauge(
    "streamqueue_limit_bound",
    "1 while the workers' model-API calls wait for the limit named by reason (no scale-up meanwhile).",
    (*_LABELS, "reason"),
)
_LIMIT_REASONS = (*wire.LIMIT_REASONS, UNKNOWN_LIMIT)
SCALE_EVENTS = Counter(
    "streamqueue_scale_events", "Replica changes made by the scaler.", (*_LABELS, "direction", "reason")
)
REDIS_ERRORS = Counter("streamqueue_redis_errors", "Polls that could not read Redis.", _LABELS)
# The operation label of API_ERRORS: what the scaler was doing (a Literal, so mypy rejects any other and
# the docs' lists are tested against it).
ApiOperation = Literal["read", "scale", "status", "deletion_cost", "housekeeping"]
API_ERRORS = Counter(
    "streamqueue_api_errors",
    "Kubernetes API requests that failed or timed out, by what the scaler was doing.",
    (*_LABELS, "operation"),
)
STATUS_WRITES = Counter("streamqueue_status_writes", "Status patches sent to the API server.", _LABELS)
CONSUMERS_DELETED = Counter(
    "streamqueue_dead_consumers_deleted", "Consumers removed after their Pod was gone.", _LABELS
)
DELETION_COST_WRITES = Counter(
    "streamqueue_pod_deletion_cost_writes",
    "Pod-deletion-cost annotations written before scale-downs (only pods whose cost changed).",
    _LABELS,
)
ENTRIES_TRIMMED = Counter("streamqueue_entries_trimmed", "Entries removed by safe trimming.", _LABELS)
LEADER = Gauge("streamqueue_operator_leader", "1 while this replica holds the Lease and may write, else 0.")
WRITES = Counter(
    "streamqueue_operator_writes",
    "Fenced writes (Deployments, status, Pods) this replica sent, by whether the fence let them through.",
    ("outcome",),
)

_GAUGES = (BACKLOG, PENDING, LAG, LAG_ESTIMATED, DESIRED, CURRENT, READY, MAX, PAUSED)


def record_observation(namespace: str, name: str, obs: Observation) -> None:
    """Recorded before any API call, so the backlog stays visible while the API server is not."""
    labels = (namespace, name)
    if obs.error:
        REDIS_ERRORS.labels(*labels).inc()
    if obs.ok:
        BACKLOG.labels(*labels).set(obs.backlog)
        PENDING.labels(*labels).set(obs.pending)
        LAG.labels(*labels).set(obs.lag)
        LAG_ESTIMATED.labels(*labels).set(int(obs.lag_estimated))
        for partition, backlog in obs.partitions:
            PARTITION_BACKLOG.labels(*labels, partition).set(backlog)
        for reason in _LIMIT_REASONS:  # one series per reason, 0 or 1, so sum by (name) says "bound"
            LIMIT_BOUND.labels(*labels, reason).set(int(obs.limit_bound == reason))


def record_replicas(
    namespace: str, name: str, decision: Decision, current: int, ready: int, max_replicas: int
) -> None:
    DESIRED.labels(namespace, name).set(decision.desired)
    CURRENT.labels(namespace, name).set(current)
    READY.labels(namespace, name).set(ready)
    MAX.labels(namespace, name).set(max_replicas)
    PAUSED.labels(namespace, name).set(int(decision.reason in PAUSES))


def record_scale(namespace: str, name: str, before: int, after: int, reason: Reason) -> None:
    SCALE_EVENTS.labels(namespace, name, "up" if after > before else "down", reason).inc()


def forget(namespace: str, name: str) -> None:
    """Drop a deleted queue's gauges so dashboards do not show a ghost queue."""
    for gauge in _GAUGES:
        try:
            gauge.remove(namespace, name)
        except KeyError:
            continue
    for labelled in (PARTITION_BACKLOG, LIMIT_BOUND):
        labelled.remove_by_labels({"namespace": namespace, "name": name})


def serve(port: int, address: str = "0.0.0.0") -> None:
    start_http_server(port, addr=address)
