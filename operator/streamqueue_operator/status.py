"""Build the StreamQueue status and decide whether it is worth writing.

Status is written only on meaningful change: a condition's status or reason, the replica counts,
the lag estimate flag, a scale. Counters that move on every poll (backlog, pending, lag) are
refreshed at most every ``min_interval`` seconds, or at once when the backlog empties or fills, so
API writes are bounded per busy queue and zero for idle ones, whatever the poll rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .decide import Decision
from .observe import Observation

READY = "Ready"
REDIS_REACHABLE = "RedisReachable"
SCALING = "Scaling"
LAG_ESTIMATED = "LagEstimated"

_VOLATILE = ("backlog", "lag", "pending", "streamLength", "consumers")


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


def _condition(
    kind: str, ok: bool, reason: str, message: str, generation: int, previous: list[dict[str, Any]]
) -> dict[str, Any]:
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    since = now_iso() if old is None or old.get("status") != status else old["lastTransitionTime"]
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def _ready(s: Snapshot) -> tuple[bool, str, str]:
    o = s.observation
    if s.deployment_error:
        return False, "DeploymentError", s.deployment_error
    if o.error:
        return False, "RedisUnavailable", "cannot observe the queue; replicas are held"
    if o.group_missing:
        return False, "GroupMissing", "the consumer group does not exist yet (workers create it on start)"
    if s.decision.desired == 0:
        return True, "ScaledToZero", "idle; a new message wakes a worker"
    if s.ready == 0:
        return False, "NoReadyWorkers", f"0 of {s.current} worker(s) ready"
    return True, "Serving", f"{s.ready} of {s.current} worker(s) ready"


def build(s: Snapshot, previous: dict[str, Any]) -> dict[str, Any]:
    """The full status for this poll; condition transition times carry over from ``previous``."""
    o, d, gen = s.observation, s.decision, s.generation
    prev = previous.get("conditions") or []
    ready_ok, ready_reason, ready_message = _ready(s)
    conditions = [
        _condition(READY, ready_ok, ready_reason, ready_message, gen, prev),
        _condition(
            REDIS_REACHABLE,
            o.error is None,
            "Reachable" if o.error is None else "ConnectionFailed",
            o.error or "XINFO succeeded",
            gen,
            prev,
        ),
        _condition(
            SCALING,
            s.ready != d.desired,
            d.reason,
            f"desired {d.desired}, current {s.current}, ready {s.ready}",
            gen,
            prev,
        ),
    ]
    status: dict[str, Any] = {
        "observedGeneration": gen,
        "deployment": s.deployment,
        "desiredReplicas": d.desired,
        "currentReplicas": s.current,
        "replicas": f"{s.current}/{d.desired}",
        "lastScaleTime": s.last_scale_time,
        "lastScaleReason": s.last_scale_reason,
    }
    if o.ok:
        conditions.append(
            _condition(
                LAG_ESTIMATED,
                o.lag_estimated,
                "NilLag" if o.lag_estimated else "Exact",
                "Redis reported lag as nil (after XDEL, XTRIM or SETID): lag is an upper-bound estimate"
                if o.lag_estimated
                else "lag reported by Redis",
                gen,
                prev,
            )
        )
        status.update(
            backlog=o.backlog,
            lag=o.lag,
            lagEstimated=o.lag_estimated,
            pending=o.pending,
            streamLength=o.stream_length,
            consumers=o.consumers,
        )
    else:
        conditions += [c for c in prev if c.get("type") == LAG_ESTIMATED]
        status.update({k: previous.get(k) for k in (*_VOLATILE, "lagEstimated") if k in previous})
    status["conditions"] = conditions
    return {k: v for k, v in status.items() if v is not None}


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
