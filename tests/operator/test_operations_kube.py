"""Operations on the local control plane: idle pods go first on scale-down, pause, cold starts, limits.

The worker pods are run by the pod runner with the stand-in worker (it consumes nothing), so the
test decides exactly which consumer holds which entries; the real kube-controller-manager's
Deployment and ReplicaSet controllers pick the pods a scale-down removes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from streamqueue import wire
from streamqueue_harness.eventually import eventually
from streamqueue_harness.nodequeue import ModelStandIn
from streamqueue_harness.podrunner import WorkerPodRunner
from streamqueue_harness.ports import free_port
from streamqueue_operator.deletion_cost import ANNOTATION

from tests.operator.queues import CGROUP, STREAM, Queues, metric, push, steady

pytestmark = pytest.mark.kube

STANDIN = [sys.executable, str(Path(__file__).parents[1] / "harness" / "standin_worker.py")]


def live_pods(sq: Queues, queue: str) -> dict[str, dict[str, str]]:
    """Pod name -> annotations, for the queue's pods that are not being deleted."""
    pods = k8s.CoreV1Api(sq.api).list_namespaced_pod(
        sq.namespace, label_selector=f"streamqueue.io/queue={queue}"
    )
    return {
        p.metadata.name: dict(p.metadata.annotations or {})
        for p in pods.items
        if not p.metadata.deletion_timestamp
    }


def standin_runner(sq: Queues, queue: str, tmp_path: Path, **env: str) -> WorkerPodRunner:
    return WorkerPodRunner(
        sq.plane.kubeconfig,
        sq.namespace,
        f"streamqueue.io/queue={queue}",
        command=STANDIN,
        env_overrides={"STANDIN_DIR": str(tmp_path / "standin"), **env},
    )


def test_scale_down_removes_idle_pods_first(sq: Queues, start_operator: Any, tmp_path: Path) -> None:
    """The two newest pods hold entries in flight, the two older ones are idle. Left to itself the
    ReplicaSet controller removes the newest pods first; with the deletion costs the operator sets
    just before the scale-down, it removes the idle ones."""
    start_operator()
    r = sq.stream(backlog=10)
    sq.apply("busy", minReplicas=1, maxReplicas=4, scaleDownStabilizationSeconds=2)
    with standin_runner(sq, "busy", tmp_path):
        older = set(eventually(lambda: len(p := live_pods(sq, "busy")) == 2 and p, "2 pods", timeout=30))
        push(r, 10)
        pods = eventually(lambda: len(p := live_pods(sq, "busy")) == 4 and p, "4 pods", timeout=30)
        assert not any(ANNOTATION in a for a in pods.values())  # costs are written only for a scale-down
        newest = set(pods) - older
        for pod in sorted(newest):
            r.xreadgroup(CGROUP, pod, {STREAM: ">"}, count=3)  # 3 entries in flight each
        for pod in sorted(older):
            done = r.xreadgroup(CGROUP, pod, {STREAM: ">"}, count=7)[0][1]
            r.xack(STREAM, CGROUP, *[entry_id for entry_id, _ in done])  # finished its work, now idle
        # backlog 6 -> 2 replicas once the 2 s stabilization window has passed
        eventually(lambda: sq.replicas("busy") == 2, "the scale-down to 2", timeout=30)
        remaining = eventually(
            lambda: len(p := live_pods(sq, "busy")) == 2 and p, "2 pods left after the scale-down", timeout=30
        )
        assert set(remaining) == newest, (remaining, newest)
        assert all(int(a[ANNOTATION]) >= 3000 for a in remaining.values()), remaining
    (delayed,) = events(sq, "busy", "ScaleDownDelayed")  # the 2 s window's hold, said once
    assert "stabilization window" in delayed.message


def events(sq: Queues, name: str, reason: str) -> list[Any]:
    found = k8s.CoreV1Api(sq.api).list_namespaced_event(
        sq.namespace, field_selector=f"involvedObject.kind=StreamQueue,involvedObject.name={name}"
    )
    return [e for e in found.items if e.reason == reason]


def annotate(sq: Queues, name: str, *pairs: str) -> None:
    sq.plane.kubectl("annotate", "--overwrite", "streamqueue", name, "-n", sq.namespace, *pairs)


def test_pause_holds_sets_refuses_and_resumes(sq: Queues, start_operator: Any) -> None:
    start_operator()
    r = sq.stream(backlog=10)
    # no worker runs here, so no pod is ever Ready: coldStartSeconds 0 keeps the cold-start hold out of it
    sq.apply("held", minReplicas=1, maxReplicas=5, scaleDownStabilizationSeconds=0, coldStartSeconds=0)
    eventually(lambda: sq.replicas("held") == 2, "2 replicas for a backlog of 10", timeout=30)

    annotate(sq, "held", "streamqueue.io/paused=true")
    eventually(lambda: sq.condition("held", "Paused").get("status") == "True", "Paused=True", timeout=15)
    push(r, 15)  # backlog 25: 5 replicas, were it not paused
    eventually(
        lambda: sq.get("held")["status"].get("backlog") == 25, "the paused queue's backlog", timeout=15
    )
    assert sq.replicas("held") == 2 and sq.get("held")["status"]["paused"] is True
    assert "would be 5" in sq.condition("held", "Paused")["message"]

    annotate(sq, "held", "streamqueue.io/paused-replicas=4")
    eventually(lambda: sq.replicas("held") == 4, "paused-replicas sets 4", timeout=15)
    annotate(sq, "held", "streamqueue.io/paused-replicas=-1")
    invalid = eventually(
        lambda: (c := sq.condition("held", "Paused")).get("reason") == "InvalidAnnotation" and c,
        "the invalid value reported",
        timeout=15,
    )
    assert "'-1'" in invalid["message"] and "holding 4" in invalid["message"]
    warning = eventually(lambda: events(sq, "held", "InvalidPauseAnnotation"), "a Warning Event", timeout=15)
    assert warning[0].type == "Warning" and sq.replicas("held") == 4

    sq.plane.kubectl(
        "annotate",
        "streamqueue",
        "held",
        "-n",
        sq.namespace,
        "streamqueue.io/paused-",
        "streamqueue.io/paused-replicas-",
    )
    eventually(lambda: sq.replicas("held") == 5, "scaling resumes: 5 for a backlog of 25", timeout=15)
    eventually(lambda: events(sq, "held", "Resumed"), "a Resumed Event", timeout=15)
    # the poll posts its Events before it writes the status
    eventually(lambda: sq.condition("held", "Paused")["status"] == "False", "Paused=False", timeout=15)
    assert len(events(sq, "held", "Paused")) == 1  # on change only, not per poll


def test_cold_start_does_not_overshoot(sq: Queues, start_operator: Any, tmp_path: Path) -> None:
    """Workers take 10-20 s to become Ready (a model loading). A backlog that grows while they start
    does not raise replicas beyond the count asked for, until they are Ready; then the policy applies."""
    start_operator()
    r = sq.stream()
    sq.apply("cold", minReplicas=1, maxReplicas=20, coldStartSeconds=60, scaleDownStabilizationSeconds=600)
    slow = ["bash", "-c", 'sleep $((10 + RANDOM % 11)); exec "$0" "$@"', *STANDIN]
    apps = k8s.AppsV1Api(sq.api)
    with WorkerPodRunner(
        sq.plane.kubeconfig,
        sq.namespace,
        "streamqueue.io/queue=cold",
        command=slow,
        env_overrides={"STANDIN_DIR": str(tmp_path / "standin")},
    ):
        eventually(lambda: sq.replicas("cold") == 1, "the worker Deployment", timeout=30)
        eventually(
            lambda: apps.read_namespaced_deployment("cold-worker", sq.namespace).status.ready_replicas == 1,
            "the first worker Ready",
            timeout=60,
        )
        push(r, 20)
        eventually(lambda: sq.replicas("cold") == 4, "4 replicas for a backlog of 20", timeout=15)
        push(r, 40)  # backlog 60 while 3 pods start: 12 replicas once they are Ready
        seen, reasons = [], set()

        def four_ready() -> bool:
            d = apps.read_namespaced_deployment("cold-worker", sq.namespace)
            if d.status.ready_replicas == 4:
                # The operator may already have applied the policy in the same instant (12 replicas
                # with 4 Ready is right): only what was seen while they started counts.
                return True
            seen.append(d.spec.replicas)
            reasons.add(sq.condition("cold", "Scaling").get("reason"))
            return False

        eventually(four_ready, "the 3 pods Ready", timeout=90)  # each pod sleeps 10-20 s before it starts
        assert seen and max(seen) == 4, seen  # no overshoot while they started
        assert "ColdStart" in reasons, reasons  # kubectl describe said why
        eventually(lambda: sq.replicas("cold") == 12, "the policy once they are Ready", timeout=15)
    (hold,) = events(sq, "cold", "ColdStartHold")  # one Event for the whole hold, not one per poll
    assert "not Ready yet" in hold.message


def test_a_limit_bound_queue_is_not_scaled_up(sq: Queues, start_operator: Any) -> None:
    """The workers' calls wait for the model API's requests-per-minute limit (the key set as a worker sets
    it): the backlog grows, replicas stay, the LimitBound condition, an Event and the gauge say why; once
    the key expires the policy scales up."""
    port = free_port()
    start_operator(f"--metrics-port={port}")
    r = sq.stream(backlog=10)
    # no worker runs here, so no pod is ever Ready: coldStartSeconds 0 keeps the cold-start hold out of it
    sq.apply("bound", worker={"modelRequestsPerMinute": 600}, maxReplicas=10, coldStartSeconds=0)
    eventually(lambda: sq.replicas("bound") == 2, "2 replicas for a backlog of 10", timeout=30)
    eventually(
        lambda: sq.condition("bound", "LimitBound").get("reason") == "WithinLimits", "LimitBound=False"
    )

    key = wire.limit_bound_key(STREAM)

    def wait_for_the_limit() -> None:  # what a worker does at each wait: the reason, PX the TTL
        r.set(key, wire.LIMIT_REQUESTS, px=wire.LIMIT_BOUND_TTL_MS)

    wait_for_the_limit()
    eventually(lambda: sq.condition("bound", "LimitBound").get("status") == "True", "LimitBound=True")
    limit = sq.condition("bound", "LimitBound")
    assert limit["reason"] == "RequestsPerMinute"
    assert "modelRequestsPerMinute: 600" in limit["message"] and "would not help" in limit["message"]
    wait_for_the_limit()
    push(r, 30)  # backlog 40: 8 replicas, were it not bound
    eventually(
        lambda: sq.get("bound")["status"].get("backlog") == 40, "the bound queue's backlog", timeout=15
    )
    assert sq.replicas("bound") == 2 and sq.condition("bound", "Scaling")["reason"] == "LimitBound"
    wait_for_the_limit()
    assert set(steady(lambda: sq.replicas("bound"), 2)) == {2}
    (event,) = eventually(lambda: events(sq, "bound", "LimitBound"), "the LimitBound Event", timeout=10)
    assert "limit-bound (RequestsPerMinute)" in event.message and "holding 2 instead of 8" in event.message
    labels = {"namespace": sq.namespace, "name": "bound", "reason": "RequestsPerMinute"}
    assert metric(port, "streamqueue_limit_bound", labels) == 1

    r.pexpire(key, 500)  # the workers' last wait: the key lapses shortly after
    eventually(lambda: sq.replicas("bound") == 8, "the scale-up once the key has expired", timeout=15)
    eventually(
        lambda: sq.condition("bound", "LimitBound").get("reason") == "WithinLimits", "LimitBound=False"
    )
    assert metric(port, "streamqueue_limit_bound", labels) == 0
    assert len(events(sq, "bound", "LimitBound")) == 1


def test_real_workers_at_their_model_limit_keep_the_queue_from_scaling_up(
    sq: Queues, start_operator: Any
) -> None:
    """End to end: worker pods (``python -m streamqueue.worker``) call a model endpoint under a shared
    limit of 300 requests/min; their waits set the bound key, so a backlog that would ask for 10 pods
    keeps the one there is, the LimitBound condition says why, and the endpoint sees the limit's rate."""
    model = ModelStandIn("127.0.0.1", delay_s=0)
    start_operator()
    r = sq.stream()
    worker = {"handlerUrl": model.url, "modelRequestsPerMinute": 300}
    sq.apply("metered", worker=worker, minReplicas=1, maxReplicas=10, targetBacklogPerReplica=5)
    runner = WorkerPodRunner(sq.plane.kubeconfig, sq.namespace, "streamqueue.io/queue=metered")
    runner.start()
    try:
        eventually(lambda: sq.replicas("metered") == 1, "the worker Deployment", timeout=30)
        apps = k8s.AppsV1Api(sq.api)
        ready = lambda: apps.read_namespaced_deployment("metered-worker", sq.namespace).status.ready_replicas  # noqa: E731
        eventually(lambda: ready() == 1, "the worker pod Ready", timeout=60)
        push(r, 3)  # 5 calls/s, one at a time: the second and third wait for the limit
        eventually(lambda: r.get(wire.limit_bound_key(STREAM)) == b"RequestsPerMinute", "a wait", timeout=15)
        push(r, 60)  # backlog ~60: 10 replicas were the queue not limit-bound
        bound = lambda: sq.condition("metered", "LimitBound").get("status") == "True"  # noqa: E731
        eventually(bound, "LimitBound=True", timeout=15)
        assert set(steady(lambda: sq.replicas("metered"), 4)) == {1}
        assert sq.condition("metered", "Scaling")["reason"] == "LimitBound"
        eventually(lambda: len(model.arrivals) == 63, "every message answered", timeout=60)
    finally:
        runner.stop()
        model.close()
    calls = model.arrivals
    rate = (len(calls) - 1) / (calls[-1] - calls[0])
    assert rate <= 5.5, f"{rate:.2f} calls/s under a limit of 5/s"
