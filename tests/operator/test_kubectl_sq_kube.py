"""``kubectl sq`` against the real kube-apiserver and redis-server (``--direct``: Redis is on loopback),
with the operator running and the queue's worker pods run by the pod runner as real worker processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from streamqueue import wire
from streamqueue_harness.eventually import eventually
from streamqueue_harness.podrunner import WorkerPodRunner

from tests.operator.queues import STREAM, Queues, push

pytestmark = pytest.mark.kube

PLUGIN = Path(sys.executable).parent / "kubectl-sq"  # the console script the package installs
TOKEN = "tok-never-in-a-report"


def kubectl_sq(sq: Queues, *argv: str, check: bool = True) -> str:
    """Run the installed plugin as a user would, with the control plane's kubectl and kubeconfig."""
    env = {**os.environ, "KUBECTL": str(sq.plane.bin_dir / "kubectl")}
    scope = ["--kubeconfig", str(sq.plane.kubeconfig), "-n", sq.namespace, "--direct"]
    done = subprocess.run(
        [str(PLUGIN), *argv, *scope], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"kubectl sq {' '.join(argv)} exited {done.returncode}: {done.stderr}")
    return done.stdout


def as_json(sq: Queues, *argv: str) -> Any:
    return json.loads(kubectl_sq(sq, *argv, "-o", "json"))


def test_kubectl_finds_the_plugin_on_path(control_plane: Any) -> None:
    env = {**os.environ, "PATH": f"{PLUGIN.parent}{os.pathsep}{os.environ['PATH']}"}
    kubectl = str(control_plane.bin_dir / "kubectl")
    listed = subprocess.run([kubectl, "plugin", "list"], env=env, capture_output=True, text=True, check=False)
    assert str(PLUGIN) in listed.stdout
    helped = subprocess.run([kubectl, "sq", "--help"], env=env, capture_output=True, text=True, check=True)
    assert "usage: kubectl sq" in helped.stdout


def test_status_dead_letters_pause_resume_drain_and_report(
    sq: Queues, start_operator: Any, tmp_path: Path
) -> None:
    r = sq.stream()
    worker = {"env": [{"name": "MODEL_API_TOKEN", "value": TOKEN}]}
    sq.apply("chat", worker=worker, minReplicas=1, maxReplicas=2, targetBacklogPerReplica=1000)
    start_operator()
    apps = k8s.AppsV1Api(sq.api)
    with WorkerPodRunner(sq.plane.kubeconfig, sq.namespace, "streamqueue.io/queue=chat", log_dir=tmp_path):
        eventually(lambda: sq.replicas("chat") == 1 and _ready(apps, sq) == 1, "a worker ready", timeout=90)
        for i in range(3):
            r.xadd(STREAM, {wire.MESSAGE: f"no user {i}"})  # dead-lettered: missing_user_id
        r.xadd(STREAM, {wire.USER_ID: "bad id!", wire.MESSAGE: "hi", wire.REQUEST_ID: "r-bad"})

        status = eventually(
            lambda: (s := as_json(sq, "status", "chat"))["redis"]["dead_letters"] == 4 and s,
            "four dead letters in the status", timeout=30,
        )  # fmt: skip
        assert status["redis"]["backlog"] == 0 and status["redis"]["consumers"]
        assert status["redis"]["partitions"][0]["stream"] == STREAM
        table = kubectl_sq(sq, "status", "chat")
        assert "PARTITION" in table and "Operator leader:" in table and "dead letters 4" in table

        _dead_letters(sq)
        _pause_and_resume(sq, apps)
        _drain(sq, r)

        report = kubectl_sq(sq, "report", "chat")
    assert TOKEN not in report
    sections = json.loads(report)
    assert sections["streamqueue"]["metadata"]["name"] == "chat"
    assert sections["redis"]["dead_letters"] == 1 and sections["pods"] is not None
    assert sections["deployment"]["metadata"]["name"] == "chat-worker"


def _ready(apps: k8s.AppsV1Api, sq: Queues) -> int:
    return apps.read_namespaced_deployment("chat-worker", sq.namespace).status.ready_replicas or 0


def _dead_letters(sq: Queues) -> None:
    invalid = as_json(sq, "dlq", "list", "chat", "--reason", wire.REASON_INVALID_USER_ID)["dead_letters"]
    assert [(d["user_id"], d["request_id"]) for d in invalid] == [("bad id!", "r-bad")]
    assert "bad id!" in kubectl_sq(sq, "dlq", "show", "chat", invalid[0]["id"])
    dry = as_json(sq, "dlq", "purge", "chat", "--reason", wire.REASON_MISSING_USER_ID, "--dry-run")
    assert len(dry["dead_letters"]) == 3
    assert len(as_json(sq, "dlq", "list", "chat")["dead_letters"]) == 4
    assert "Purged 3" in kubectl_sq(sq, "dlq", "purge", "chat", "--reason", wire.REASON_MISSING_USER_ID)
    assert "Redrove 1" in kubectl_sq(sq, "dlq", "redrive", "chat", "--all")
    back = eventually(
        lambda: as_json(sq, "dlq", "list", "chat")["dead_letters"], "the redriven entry dead-lettered again"
    )
    assert [(d["request_id"], d["redrives"], d["dead_lettered"]) for d in back] == [("r-bad", 1, 2)]


def _pause_and_resume(sq: Queues, apps: k8s.AppsV1Api) -> None:
    assert "paused at 0" in as_json(sq, "pause", "chat", "--replicas", "0")["message"]
    eventually(lambda: sq.replicas("chat") == 0, "paused at 0", timeout=30)
    assert (
        as_json(sq, "status", "chat")["queue"]["paused"]
        == "streamqueue.io/paused=true, streamqueue.io/paused-replicas=0"
    )
    kubectl_sq(sq, "resume", "chat")
    assert not {
        k for k in sq.get("chat")["metadata"].get("annotations", {}) if k.startswith("streamqueue.io/paused")
    }
    eventually(lambda: _ready(apps, sq) == 1, "resumed at minReplicas", timeout=60)


def _drain(sq: Queues, r: Any) -> None:
    push(r, 40)
    out = kubectl_sq(sq, "drain", "chat", "--interval", "0.5", "--timeout", "120")
    assert "drained" in out
    assert as_json(sq, "status", "chat")["redis"]["backlog"] == 0
    annotations = sq.get("chat")["metadata"]["annotations"]
    assert annotations["streamqueue.io/paused-replicas"] == "0"
    eventually(lambda: sq.replicas("chat") == 0, "scaled to zero after the drain", timeout=30)
