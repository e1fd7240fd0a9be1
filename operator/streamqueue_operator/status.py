"""Build the StreamQueue status and decide whether it is worth writing.

Status is written only on meaningful change: a condition's status or reason, the replica counts,
the lag estimate flag, a scale. Counters that move on every poll (backlog, pending, lag) are
refreshed at most every ``min_interval`` seconds, or at once when the backlog empties or fills, so
API writes are bounded per busy queue and zero for idle ones, whatever the poll rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from streamqueue import wire

from .decide import HOLDS, PAUSES, Decision, Reason
from .models import Condition, StreamQueueStatus, WorkerSpec
from .observe import UNKNOWN_LIMIT, Observation

READY = "Ready"
REDIS_REACHABLE = "RedisReachable"
SCALING = "Scaling"
LAG_ESTIMATED = "LagEstimated"
PAUSED = "Paused"
LIMIT_BOUND = "LimitBound"

# The spec.worker field that configures each limit the workers report (RetryAfter is the model API's own).
LIMIT_FIELDS = {
    wire.LIMIT_REQUESTS: "model_requests_per_minute",
    wire.LIMIT_TOKENS: "model_tokens_per_minute",
    wire.LIMIT_CONCURRENT: "model_concurrent_calls",
}

INVALID_WORKER_SPEC = "InvalidWorkerSpec"


class WorkerRefusal(str):
    """A ``deployment_error`` that is the worker's own refusal of the spec (the Deployment is kept):
    Ready says ``InvalidWorkerSpec`` rather than ``DeploymentError``, so users know the spec is to fix."""


_VOLATILE = ("backlog", "lag", "pending", "streamLength", "consumers", "partitions")


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Snapshot:
    """Everything the status is made of at one poll."""

    generation: int
    deployment: str
    deployment_error: str | None
    observation: Observation
    decision: Decision
    current: int
    ready: int
    last_scale_time: str | None
    last_scale_reason: str | None
    # The configured value of the limit the queue is bound by (``limit_setting``), if any.
    limit_setting: str | None = None


def _condition(
    kind: str, ok: bool, reason: str, message: str, generation: int, previous: list[Condition]
) -> Condition:
    status: Literal["True", "False"] = "True" if ok else "False"
    old = next((c for c in previous if c.type == kind), None)
    since = now_iso() if old is None or old.status != status else old.last_transition_time
    return Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )


def _ready(s: Snapshot) -> tuple[bool, str, str]:
    o = s.observation
    if s.deployment_error:
        reason = INVALID_WORKER_SPEC if isinstance(s.deployment_error, WorkerRefusal) else "DeploymentError"
        return False, reason, s.deployment_error
    if o.error:
        return False, Reason.REDIS_UNAVAILABLE, "cannot observe the queue; replicas are held"
    if o.group_missing:
        why = "the consumer group does not exist yet (workers create it on start)"
        return False, Reason.GROUP_MISSING, why
    if s.decision.desired == 0:
        return True, "ScaledToZero", "idle; a new message wakes a worker"
    if s.ready == 0:
        return False, "NoReadyWorkers", f"0 of {s.current} worker(s) ready"
    return True, "Serving", f"{s.ready} of {s.current} worker(s) ready"


def _lag_condition(o: Observation, gen: int, prev: list[Condition]) -> Condition:
    message = (
        "Redis reported lag as nil (after XDEL, XTRIM or SETID): lag is an upper-bound estimate"
        if o.lag_estimated
        else "lag reported by Redis"
    )
    return _condition(
        LAG_ESTIMATED, o.lag_estimated, "NilLag" if o.lag_estimated else "Exact", message, gen, prev
    )


def limit_setting(worker: WorkerSpec, reason: str | None) -> str | None:
    """``spec.worker.<field>: <value>`` of the limit ``reason`` names, when the StreamQueue sets it."""
    field = LIMIT_FIELDS.get(reason or "")
    value = getattr(worker, field) if field else None
    if field is None or value is None:
        return None
    return f"spec.worker.{WorkerSpec.model_fields[field].alias}: {value}"


def _limit_condition(s: Snapshot, prev: list[Condition]) -> Condition:
    reason, gen = s.observation.limit_bound, s.generation
    if reason is None:
        message = "no model-API limit is holding the workers' calls back"
        return _condition(LIMIT_BOUND, False, "WithinLimits", message, gen, prev)
    if reason == wire.LIMIT_RETRY_AFTER:
        what = "the Retry-After of the model API's 429 answers"
    elif reason == UNKNOWN_LIMIT:
        what = "a limit this operator version does not know"
    else:
        what = f"the {reason} limit" + (f" ({s.limit_setting})" if s.limit_setting else "")
    message = (
        f"the workers' model-API calls wait for {what}: more workers would not help, so replicas are "
        f"not raised while it lasts (desired {s.decision.desired}, current {s.current})"
    )
    return _condition(LIMIT_BOUND, True, reason, message, gen, prev)


def _paused_condition(d: Decision, gen: int, prev: list[Condition]) -> Condition:
    if d.reason == Reason.PAUSE_INVALID:
        return _condition(PAUSED, True, "InvalidAnnotation", d.message, gen, prev)
    if d.reason == Reason.PAUSED:
        return _condition(PAUSED, True, Reason.PAUSED, d.message, gen, prev)
    return _condition(PAUSED, False, "NotPaused", "no pause annotation: replicas follow the queue", gen, prev)


def build(s: Snapshot, previous: dict[str, Any]) -> dict[str, Any]:
    """The full status for this poll; condition transition times carry over from ``previous``.

    Built as the CRD's own ``StreamQueueStatus`` model, so what is written is what the schema says.
    """
    o, d, gen = s.observation, s.decision, s.generation
    last = StreamQueueStatus.model_validate(previous)  # the API server checked it against the schema
    prev = last.conditions or []
    ready_ok, ready_reason, ready_message = _ready(s)
    redis_message = o.error or "XINFO succeeded"
    conditions = [
        _condition(READY, ready_ok, ready_reason, ready_message, gen, prev),
        _condition(
            REDIS_REACHABLE,
            o.error is None,
            "Reachable" if o.error is None else "ConnectionFailed",
            redis_message,
            gen,
            prev,
        ),
        _condition(
            SCALING,
            s.ready != d.desired,
            d.reason,
            f"desired {d.desired}, current {s.current}, ready {s.ready}"
            + (f": {d.message}" if d.reason in HOLDS else ""),
            gen,
            prev,
        ),
        _paused_condition(d, gen, prev),
    ]
    if o.ok:
        conditions += [_lag_condition(o, gen, prev), _limit_condition(s, prev)]
        counters = StreamQueueStatus(
            backlog=o.backlog,
            lag=o.lag,
            lag_estimated=o.lag_estimated,
            pending=o.pending,
            stream_length=o.stream_length,
            consumers=o.consumers,
            partitions=dict(o.partitions) or None,
        )
    else:  # nothing new was observed: keep the last counters, lag and limit conditions
        conditions += [c for c in prev if c.type in (LAG_ESTIMATED, LIMIT_BOUND)]
        counters = last
    status = counters.model_copy(
        update={
            "observed_generation": gen,
            "conditions": conditions,
            "deployment": s.deployment,
            "desired_replicas": d.desired,
            "current_replicas": s.current,
            "replicas": f"{s.current}/{d.desired}",
            "ready_replicas": s.ready,
            "paused": d.reason in PAUSES,
            "last_scale_time": s.last_scale_time,
            "last_scale_reason": s.last_scale_reason,
        }
    )
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def refused(previous: dict[str, Any], generation: int, message: str) -> dict[str, Any]:
    """The last status with Ready=False ``InvalidWorkerSpec``: for a spec the operator cannot read,
    which it neither observes nor scales by, so everything else stays as last written."""
    last = StreamQueueStatus.model_validate(previous)
    prev = last.conditions or []
    ready = _condition(READY, False, INVALID_WORKER_SPEC, message, generation, prev)
    conditions = [ready, *(c for c in prev if c.type != READY)]
    status = last.model_copy(update={"observed_generation": generation, "conditions": conditions})
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def _essence(status: dict[str, Any]) -> dict[str, Any]:
    core = {k: v for k, v in status.items() if k not in (*_VOLATILE, "conditions")}
    core["conditions"] = sorted((c["type"], c["status"], c["reason"]) for c in status.get("conditions") or [])
    return core


def worth_writing(
    old: dict[str, Any], new: dict[str, Any], since_last_write: float, min_interval: float
) -> bool:
    """True when the change matters now, or the counters changed and ``min_interval`` has passed."""
    if _essence(old) != _essence(new):
        return True
    if (old.get("backlog") == 0) != (new.get("backlog") == 0):
        return True
    counters_moved = any(old.get(k) != new.get(k) for k in _VOLATILE) or old.get("conditions") != new.get(
        "conditions"
    )
    return counters_moved and since_last_write >= min_interval
