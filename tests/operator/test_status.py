"""Status content and the meaningful-change rule that keeps API writes independent of poll rate."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydantic import ValidationError
from streamqueue_operator.decide import Decision, Reason
from streamqueue_operator.deployment import spec_refusal, worker_refusal
from streamqueue_operator.models import WorkerSpec, parse_spec
from streamqueue_operator.observe import Observation
from streamqueue_operator.status import (
    Snapshot,
    WorkerRefusal,
    build,
    limit_setting,
    refused,
    worth_writing,
)


def snap(
    obs: Observation, desired: int = 2, current: int = 2, ready: int = 2, error: str | None = None
) -> Snapshot:
    return Snapshot(
        generation=3, deployment="q-worker", deployment_error=error, observation=obs,
        decision=Decision(desired, Reason.BACKLOG, "msg"), current=current, ready=ready,
        last_scale_time=None, last_scale_reason=None,
    )  # fmt: skip


def ok(lag: int = 10, pending: int = 2, estimated: bool = False) -> Observation:
    return Observation(at=1, lag=lag, pending=pending, lag_estimated=estimated, stream_length=12, consumers=2)


def conditions(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_serving_queue_status_and_columns() -> None:
    s = build(snap(ok()), {})
    assert (s["backlog"], s["lag"], s["pending"], s["replicas"]) == (12, 10, 2, "2/2")
    assert conditions(s) == {
        "Ready": ("True", "Serving"),
        "RedisReachable": ("True", "Reachable"),
        "Scaling": ("False", "Backlog"),
        "LagEstimated": ("False", "Exact"),
        "Paused": ("False", "NotPaused"),
        "LimitBound": ("False", "WithinLimits"),
    }
    assert s["readyReplicas"] == 2 and s["paused"] is False
    assert all(c["observedGeneration"] == 3 and c["lastTransitionTime"] for c in s["conditions"])


def test_redis_error_keeps_last_counts_and_says_why() -> None:
    before = build(snap(ok()), {})
    s = build(snap(Observation(at=2, error="ConnectionError: refused")), before)
    assert conditions(s)["Ready"] == ("False", "RedisUnavailable")
    assert conditions(s)["RedisReachable"] == ("False", "ConnectionFailed")
    assert s["backlog"] == 12 and conditions(s)["LagEstimated"] == ("False", "Exact")
    assert worth_writing(before, s, since_last_write=0.1, min_interval=10)


def test_transition_time_changes_only_with_status() -> None:
    first = build(snap(ok()), {})
    for c in first["conditions"]:
        c["lastTransitionTime"] = "2000-01-01T00:00:00Z"
    again = build(snap(ok(lag=50)), first)
    assert all(c["lastTransitionTime"] == "2000-01-01T00:00:00Z" for c in again["conditions"])
    flipped = build(snap(ok(estimated=True)), first)
    lag_cond = next(c for c in flipped["conditions"] if c["type"] == "LagEstimated")
    assert lag_cond["lastTransitionTime"] != "2000-01-01T00:00:00Z"


def test_counter_changes_wait_for_the_interval_but_meaningful_changes_do_not() -> None:
    old = build(snap(ok(lag=10)), {})
    busier = build(snap(ok(lag=40)), old)
    assert not worth_writing(old, busier, since_last_write=1, min_interval=10)
    assert worth_writing(old, busier, since_last_write=10, min_interval=10)
    assert not worth_writing(old, build(snap(ok(lag=10)), old), since_last_write=3600, min_interval=10)
    assert worth_writing(old, build(snap(ok(lag=0, pending=0)), old), since_last_write=0.1, min_interval=10)
    assert worth_writing(old, build(snap(ok(), desired=3), old), since_last_write=0.1, min_interval=10)
    assert worth_writing(old, build(snap(ok(estimated=True)), old), since_last_write=0.1, min_interval=10)


def test_deployment_error_and_scaled_to_zero() -> None:
    s = build(snap(ok(), error="Deployment q-worker is controlled by Foo/bar"), {})
    assert conditions(s)["Ready"] == ("False", "DeploymentError")
    zero = build(snap(ok(lag=0, pending=0), desired=0, current=0, ready=0), {})
    assert conditions(zero)["Ready"] == ("True", "ScaledToZero") and zero["replicas"] == "0/0"


def test_holds_say_why_in_the_scaling_condition_and_pause_in_its_own() -> None:
    def with_decision(decision: Decision) -> dict:
        base = snap(ok())
        return build(Snapshot(**{**base.__dict__, "decision": decision}), {})

    held = with_decision(Decision(4, Reason.COLD_START, "3 of 4 pod(s) not Ready yet"))
    scaling = next(c for c in held["conditions"] if c["type"] == "Scaling")
    assert scaling["reason"] == "ColdStart" and "3 of 4 pod(s) not Ready yet" in scaling["message"]
    paused = with_decision(Decision(2, Reason.PAUSED, "paused by annotation streamqueue.io/paused"))
    assert conditions(paused)["Paused"] == ("True", "Paused") and paused["paused"] is True
    invalid = with_decision(Decision(2, Reason.PAUSE_INVALID, "streamqueue.io/paused-replicas: '-1'"))
    assert conditions(invalid)["Paused"] == ("True", "InvalidAnnotation")


def test_limit_bound_condition_names_the_limit_its_setting_and_the_hold() -> None:
    def bound_status(reason: str | None, setting: str | None, previous: dict) -> dict:
        base = snap(replace(ok(), limit_bound=reason), desired=4, current=4)
        held = Decision(4, Reason.LIMIT_BOUND, "holding 4 instead of 20") if reason else base.decision
        return build(replace(base, decision=held, limit_setting=setting), previous)

    free = bound_status(None, None, {})
    assert conditions(free)["LimitBound"] == ("False", "WithinLimits")
    for c in free["conditions"]:
        c["lastTransitionTime"] = "2000-01-01T00:00:00Z"
    s = bound_status("RequestsPerMinute", "spec.worker.modelRequestsPerMinute: 600", free)
    limit = next(c for c in s["conditions"] if c["type"] == "LimitBound")
    assert (limit["status"], limit["reason"]) == ("True", "RequestsPerMinute")
    assert "RequestsPerMinute limit (spec.worker.modelRequestsPerMinute: 600)" in limit["message"]
    assert "more workers would not help" in limit["message"] and "desired 4, current 4" in limit["message"]
    assert limit["lastTransitionTime"] != "2000-01-01T00:00:00Z"
    assert worth_writing(free, s, since_last_write=0.1, min_interval=10)
    scaling = next(c for c in s["conditions"] if c["type"] == "Scaling")
    assert scaling["reason"] == "LimitBound" and "holding 4 instead of 20" in scaling["message"]
    again = bound_status("RequestsPerMinute", "spec.worker.modelRequestsPerMinute: 600", s)
    assert not worth_writing(s, again, since_last_write=0.1, min_interval=10)
    retry = bound_status("RetryAfter", None, s)
    assert "Retry-After" in next(c for c in retry["conditions"] if c["type"] == "LimitBound")["message"]
    down = build(snap(Observation(at=2, error="ConnectionError: refused")), s)
    assert conditions(down)["LimitBound"] == ("True", "RequestsPerMinute")  # unknown now: the last one stays


def test_limit_setting_reads_the_worker_spec() -> None:
    worker = WorkerSpec.model_validate({"modelTokensPerMinute": 90000})
    assert limit_setting(worker, "TokensPerMinute") == "spec.worker.modelTokensPerMinute: 90000"
    assert limit_setting(worker, "RequestsPerMinute") is None  # set elsewhere (worker.env), or not at all
    assert limit_setting(worker, "RetryAfter") is None and limit_setting(worker, None) is None


def test_a_spec_the_worker_refuses_is_reported_as_invalid_worker_spec() -> None:
    """The operator keeps the Deployment and says the spec is to fix (handlers._ensure_deployment)."""
    spec = parse_spec({"worker": {"env": [{"name": "STREAMQUEUE_HANDLER", "value": "nocolon"}]}})
    refusal = worker_refusal(spec)
    assert refusal is not None and refusal.startswith("STREAMQUEUE_HANDLER: String should match pattern")
    s = build(snap(ok(), error=WorkerRefusal(refusal)), {})
    ready = next(c for c in s["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "InvalidWorkerSpec", refusal)


def test_a_spec_the_operator_cannot_read_keeps_the_last_status_but_ready() -> None:
    """Let in by an older CRD: nothing is observed or scaled, Ready names the field (scaler.poll)."""
    with pytest.raises(ValidationError) as caught:
        parse_spec({"worker": {"handler": "nocolon"}})
    message = spec_refusal(caught.value)
    assert message.startswith(
        "not rolled out: the operator cannot read the spec: spec.worker.handler: String should match pattern"
    )
    before = build(snap(ok()), {})
    s = refused(before, 4, message)
    ready = next(c for c in s["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "InvalidWorkerSpec", message)
    assert s["observedGeneration"] == 4
    assert [c for c in s["conditions"] if c["type"] != "Ready"] == before["conditions"][1:]
    assert {k: v for k, v in s.items() if k not in ("conditions", "observedGeneration")} == {
        k: v for k, v in before.items() if k not in ("conditions", "observedGeneration")
    }
    assert worth_writing(before, s, since_last_write=0.1, min_interval=10)
    assert not worth_writing(s, refused(s, 4, message), since_last_write=100, min_interval=10)
    assert conditions(refused({}, 1, message)) == {"Ready": ("False", "InvalidWorkerSpec")}
