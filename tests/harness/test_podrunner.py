"""The worker-pod runner turns a Deployment's Pods into local processes, and scale-down into SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from streamqueue_harness.controlplane import ControlPlane
from streamqueue_harness.eventually import eventually
from streamqueue_harness.podrunner import DEFAULT_NODE, WorkerPodRunner

pytestmark = pytest.mark.kube

STANDIN = [sys.executable, str(Path(__file__).with_name("standin_worker.py"))]
LABELS = {"app": "standin"}
SELECTOR = "app=standin"


def _deployment(
    replicas: int, grace: int = 20, probe_period: int = 5, liveness: bool = False
) -> dict[str, Any]:
    env = [
        {"name": "STREAMQUEUE_REDIS_URL", "value": "redis://redis.in-cluster:6379"},
        {
            "name": "STREAMQUEUE_REDIS_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "redis", "key": "password"}},
        },
        {
            "name": "STREAMQUEUE_BATCH_SIZE",
            "valueFrom": {"configMapKeyRef": {"name": "tuning", "key": "batch"}},
        },
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "STREAMQUEUE_HEALTH_PORT", "value": "8080"},
    ]
    container = {
        "name": "worker", "image": "streamqueue/worker:test", "env": env,
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": 8080},
            "periodSeconds": probe_period,
            "failureThreshold": 2,
        },
    }  # fmt: skip
    if liveness:
        container["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "standin"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": LABELS},
            "template": {
                "metadata": {"labels": LABELS},
                "spec": {"containers": [container], "terminationGracePeriodSeconds": grace},
            },
        },
    }


def _setup(plane: ControlPlane, namespace: str, deployment: dict[str, Any]) -> None:
    plane.kubectl("create", "secret", "generic", "redis", "--from-literal=password=s3cret", "-n", namespace)
    plane.kubectl("create", "configmap", "tuning", "--from-literal=batch=25", "-n", namespace)
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(deployment))


def _pods(plane: ControlPlane, namespace: str) -> dict[str, dict[str, Any]]:
    listing = json.loads(plane.kubectl("get", "pods", "-n", namespace, "-l", SELECTOR, "-o", "json").stdout)
    return {p["metadata"]["name"]: p for p in listing["items"]}


def _ready_replicas(plane: ControlPlane, namespace: str) -> int:
    deployment = json.loads(
        plane.kubectl("get", "deployment", "standin", "-n", namespace, "-o", "json").stdout
    )
    return int(deployment["status"].get("readyReplicas", 0))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _runner(plane: ControlPlane, namespace: str, evidence: Path, **extra_env: str) -> WorkerPodRunner:
    overrides = {"STANDIN_DIR": str(evidence), "STREAMQUEUE_REDIS_URL": "redis://127.0.0.1:1/0", **extra_env}
    return WorkerPodRunner(
        plane.kubeconfig,
        namespace,
        SELECTOR,
        command=STANDIN,
        env_overrides=overrides,
        log_dir=evidence / "logs",
    )


def test_one_process_per_replica_then_sigterm_on_scale_down(
    control_plane: ControlPlane, kube_namespace: str, tmp_path: Path
) -> None:
    ns = kube_namespace
    _setup(control_plane, ns, _deployment(replicas=3))
    with _runner(control_plane, ns, tmp_path) as runner:
        eventually(lambda: _ready_replicas(control_plane, ns) == 3, "3 ready replicas")
        pods = _pods(control_plane, ns)
        running = runner.running()
        assert set(running) == set(pods) and len(set(running.values())) == 3
        ports = set()
        for name, pod in pods.items():
            assert pod["spec"]["nodeName"] == DEFAULT_NODE and pod["status"]["phase"] == "Running"
            env = json.loads((tmp_path / name / "env.json").read_text())
            assert env["STREAMQUEUE_CONSUMER"] == env["HOSTNAME"] == name
            assert env["STREAMQUEUE_REDIS_PASSWORD"] == "s3cret" and env["STREAMQUEUE_BATCH_SIZE"] == "25"
            assert env["POD_NAMESPACE"] == ns
            assert env["STREAMQUEUE_REDIS_URL"] == "redis://127.0.0.1:1/0"  # the override wins over the Pod
            ports.add(env["STREAMQUEUE_HEALTH_PORT"])
        assert "8080" not in ports and len(ports) == 3

        control_plane.kubectl("scale", "deployment", "standin", "--replicas=1", "-n", ns)
        eventually(
            lambda: len(runner.running()) == 1 and len(_pods(control_plane, ns)) == 1, "scale-down to 1"
        )
        (survivor,) = runner.running()
        assert runner.running()[survivor] == running[survivor]
        for name in set(running) - {survivor}:
            assert (tmp_path / name / "sigterm").exists(), f"{name} was not sent SIGTERM"
            assert not _alive(running[name])
    assert not _alive(running[survivor]), "the runner left a process behind"


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(
    control_plane: ControlPlane, kube_namespace: str, tmp_path: Path
) -> None:
    ns = kube_namespace
    _setup(control_plane, ns, _deployment(replicas=1, grace=3))
    with _runner(control_plane, ns, tmp_path, STANDIN_IGNORE_SIGTERM="1") as runner:
        (name, pid) = eventually(lambda: list(runner.running().items()), "a running pod")[0]
        eventually(lambda: _ready_replicas(control_plane, ns) == 1, "a ready replica")
        control_plane.kubectl("delete", "pod", name, "-n", ns, "--wait=false")
        eventually(lambda: (tmp_path / name / "sigterm").exists(), "SIGTERM to arrive")
        assert _alive(pid), "killed before its grace period"
        eventually(
            lambda: not _alive(pid) and name not in _pods(control_plane, ns), "SIGKILL and pod removal"
        )
        # The ReplicaSet replaces the Pod and the runner starts its process.
        eventually(lambda: len(runner.running()) == 1 and name not in runner.running(), "the replacement")


def test_a_crashed_process_is_restarted_and_the_restart_reported(
    control_plane: ControlPlane, kube_namespace: str, tmp_path: Path
) -> None:
    ns = kube_namespace
    _setup(control_plane, ns, _deployment(replicas=1))
    with _runner(control_plane, ns, tmp_path, STANDIN_EXIT_CODE="3"):
        (name,) = eventually(lambda: list(_pods(control_plane, ns)), "the pod")
        eventually(lambda: len(_starts(tmp_path / name)) >= 2, "a restart")

        def restart_reported() -> dict[str, Any] | None:
            statuses = _pods(control_plane, ns)[name]["status"].get("containerStatuses") or [{}]
            return statuses[0] if statuses[0].get("restartCount", 0) >= 1 else None

        status = eventually(restart_reported, "restartCount in the pod status")
        assert status["ready"] is False
        assert _ready_replicas(control_plane, ns) == 0


def _starts(evidence: Path) -> list[str]:
    path = evidence / "starts"
    return path.read_text().split() if path.exists() else []


def test_readiness_follows_the_probe_after_the_first_ready(
    control_plane: ControlPlane, kube_namespace: str, tmp_path: Path
) -> None:
    ns = kube_namespace
    _setup(control_plane, ns, _deployment(replicas=1, probe_period=1))
    with _runner(control_plane, ns, tmp_path) as runner:
        eventually(lambda: _ready_replicas(control_plane, ns) == 1, "a ready replica")
        ((name, pid),) = runner.running().items()
        os.kill(pid, signal.SIGUSR1)  # /readyz now answers 503
        eventually(lambda: _ready_replicas(control_plane, ns) == 0, "the pod reported not ready")
        assert runner.running() == {name: pid}, "an unready process is not restarted"
        os.kill(pid, signal.SIGUSR1)
        eventually(lambda: _ready_replicas(control_plane, ns) == 1, "the pod ready again")


def test_a_failing_liveness_probe_restarts_the_process(
    control_plane: ControlPlane, kube_namespace: str, tmp_path: Path
) -> None:
    ns = kube_namespace
    _setup(control_plane, ns, _deployment(replicas=1, liveness=True))
    with _runner(control_plane, ns, tmp_path) as runner:
        eventually(lambda: _ready_replicas(control_plane, ns) == 1, "a ready replica")
        ((name, pid),) = runner.running().items()
        os.kill(pid, signal.SIGUSR2)  # /healthz now answers 500
        restarted = eventually(
            lambda: runner.running().get(name, pid) != pid and runner.running(), "a restart"
        )
        assert (tmp_path / name / "sigterm").exists(), "stopped without SIGTERM"
        assert not _alive(pid)
        status = _pods(control_plane, ns)[name]["status"]["containerStatuses"][0]
        assert status["restartCount"] == 1
        eventually(lambda: _ready_replicas(control_plane, ns) == 1, "the restarted process ready")
        assert runner.running() == restarted
