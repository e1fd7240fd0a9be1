"""``kubectl sq`` against the real kube-apiserver and redis-server (``--direct``: Redis is on loopback),
with the operator running and the queue's worker pods run by the pod runner as real worker processes.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from kubernetes import client as k8s
from streamqueue import wire
from streamqueue.kubectl_sq.kube import TOOL_REDIS_SECRET
from streamqueue.worker.replies import dead_letter_fields
from streamqueue_harness.acl_users import create_generated_users
from streamqueue_harness.eventually import eventually
from streamqueue_harness.podrunner import WorkerPodRunner
from streamqueue_harness.redis_server import RedisServer
from streamqueue_operator.models import GROUP, VERSION

from tests.operator.queues import STREAM, Queues, push

pytestmark = pytest.mark.kube

PLUGIN = Path(sys.executable).parent / "kubectl-sq"  # the console script the package installs
TOKEN = "tok-never-in-a-report"


def run_plugin(sq: Queues, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run the installed plugin as a user would, with the control plane's kubectl and kubeconfig."""
    env = {**os.environ, "KUBECTL": str(sq.plane.bin_dir / "kubectl")}
    scope = ["--kubeconfig", str(sq.plane.kubeconfig), "-n", sq.namespace, "--direct"]
    return subprocess.run(
        [str(PLUGIN), *argv, *scope], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def kubectl_sq(sq: Queues, *argv: str) -> str:
    done = run_plugin(sq, *argv)
    if done.returncode != 0:
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


QUEUE_USER, TOOL_USER, TOOL_SECRET = "sq-queue", "sq-tool", "chat-sq-tool"


def _dead_letter(admin: redis.Redis, user: str, request_id: str) -> str:
    original = {wire.USER_ID: user, wire.MESSAGE: "hi", wire.REQUEST_ID: request_id, wire.TIMESTAMP: "1"}
    fields = dead_letter_fields(
        original, reason=wire.REASON_MAX_DELIVERIES, error="boom", deliveries=5, source_id="1-1",
        source_stream=STREAM, consumer="w1",
    )  # fmt: skip
    return str(admin.xadd(wire.dead_letter_stream(STREAM), fields))


def _denials(admin: redis.Redis, user: str) -> list[str]:
    return [e["object"] for e in admin.acl_log() if e["username"] == user]


def test_the_tool_runs_as_its_own_redis_user_from_a_secret(
    control_plane: Any, kube_namespace: str, api: k8s.ApiClient, start_operator: Any
) -> None:
    """A password-protected Redis with exactly the generated users: the queue's user cannot read dead
    letters (NOPERM on XRANGE); the tool's user, from a basic-auth Secret named by --redis-secret or by
    the StreamQueue's annotation, runs status and every dlq command without a denial."""
    with RedisServer(password=secrets.token_hex(12)) as server:
        admin = server.client(decode_responses=True)
        passwords = create_generated_users(admin, "--shared-user", QUEUE_USER, "--tool-user", TOOL_USER)
        assert set(passwords) == {QUEUE_USER, TOOL_USER}  # the queue's (workers and operator) and the tool's
        sq = Queues(control_plane, kube_namespace, api, f"redis://127.0.0.1:{server.port}/0")
        create = ["create", "secret", "generic", "-n", kube_namespace]
        control_plane.kubectl(*create, "redis-queue", f"--from-literal=password={passwords[QUEUE_USER]}")
        control_plane.kubectl(
            *create, TOOL_SECRET, "--type=kubernetes.io/basic-auth", f"--from-literal=username={TOOL_USER}",
            f"--from-literal=password={passwords[TOOL_USER]}",
        )  # fmt: skip
        redis_spec = {
            "url": sq.redis_url,
            "username": QUEUE_USER,
            "passwordSecretRef": {"name": "redis-queue"},
        }
        manifest = {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "StreamQueue",
            "metadata": {"name": "chat", "namespace": kube_namespace}, "spec": {"redis": redis_spec},
        }  # fmt: skip
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        start_operator()
        eventually(lambda: sq.replicas("chat") is not None, "the worker Deployment", timeout=60)
        first = _dead_letter(admin, "ada", "r1")
        _dead_letter(admin, "bo", "r2")

        as_worker = run_plugin(sq, "dlq", "list", "chat")
        assert as_worker.returncode == 1 and "xrange" in as_worker.stderr, as_worker.stderr
        listed = as_json(sq, "dlq", "list", "chat", "--redis-secret", TOOL_SECRET)["dead_letters"]
        assert [d["request_id"] for d in listed] == ["r1", "r2"]

        control_plane.kubectl(
            "annotate", "streamqueue", "chat", "-n", kube_namespace, f"{TOOL_REDIS_SECRET}={TOOL_SECRET}"
        )
        assert as_json(sq, "status", "chat")["redis"]["dead_letters"] == 2
        assert as_json(sq, "dlq", "show", "chat", first)["dead_letter"]["user_id"] == "ada"
        [redriven] = as_json(sq, "dlq", "redrive", "chat", "--user", "ada")["redriven"]
        assert redriven["new_id"] is not None and admin.xlen(STREAM) == 1
        assert as_json(sq, "dlq", "purge", "chat", "--all")["purged"] == 1
        assert _denials(admin, TOOL_USER) == []
        assert "xrange" in _denials(admin, QUEUE_USER)
