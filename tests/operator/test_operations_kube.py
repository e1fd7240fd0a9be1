"""Operations on the local control plane: idle pods go first on scale-down, pause, cold starts.

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
from streamqueue_harness.podrunner import WorkerPodRunner
from streamqueue_harness.redis_server import RedisServer
from streamqueue_operator.deletion_cost import ANNOTATION

from tests.harness.eventually import eventually
from tests.operator.queues import CGROUP, STREAM, Queues, push

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


def test_scale_down_removes_idle_pods_first(
    sq: Queues, redis_server: RedisServer, start_operator: Any, tmp_path: Path
) -> None:
    """The two newest pods hold entries in flight, the two older ones are idle. Left to itself the
    ReplicaSet controller removes the newest pods first; with the deletion costs the operator sets
    just before the scale-down, it removes the idle ones."""
    start_operator()
    r = redis_server.client()
    r.xgroup_create(STREAM, CGROUP, id="0", mkstream=True)
    push(r, 10)
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
