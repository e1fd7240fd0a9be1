"""``kubectl sq`` on the real node, where Redis is reachable only inside the cluster: the queue names
it ``redis://redis:6379/0`` (cluster DNS) with its password in a Secret, and the plugin, without
``--direct``, runs its Redis side in a pod from the worker image with the worker Deployment's
environment (``kubectl run``, then its log, then delete), as a user's machine outside the cluster would
have to; under the generated least-privilege ACL it runs as the tool's own user from its Secret.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from streamqueue import wire
from streamqueue.kubectl_sq.kube import TOOL_REDIS_SECRET
from streamqueue_harness import nodequeue as q
from streamqueue_harness.acl_users import create_generated_users
from streamqueue_harness.eventually import eventually
from streamqueue_harness.node import Node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PLUGIN = Path(sys.executable).parent / "kubectl-sq"
QUEUE, STREAM = "sqtool", "sqtool_queue"


def run_plugin(node: Node, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECTL": str(node.plane.bin_dir / "kubectl")}
    scope = ["--kubeconfig", str(node.plane.kubeconfig), "-n", q.NAMESPACE, "-o", "json"]
    return subprocess.run(
        [str(PLUGIN), *argv, *scope], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def kubectl_sq(node: Node, *argv: str) -> Any:
    done = run_plugin(node, *argv)
    assert done.returncode == 0, f"kubectl sq {' '.join(argv)}: {done.stderr}"
    return json.loads(done.stdout)


def _redis(node: Node) -> redis.Redis:
    """The Redis StatefulSet behind the Service ``redis`` (deployed here unless another test did)."""
    plane = node.plane
    exists = plane.kubectl("get", "statefulset", "redis", "-n", q.NAMESPACE, check=False).returncode == 0
    if not exists:
        q.create_redis_secret(plane, secrets.token_hex(16))
        q.deploy_redis(plane, node.images.redis)
    password = plane.kubectl(
        "get", "secret", q.REDIS_SECRET, "-n", q.NAMESPACE, "-o", "jsonpath={.data.password}"
    ).stdout
    ip = plane.kubectl(
        "get", "service", "redis", "-n", q.NAMESPACE, "-o", "jsonpath={.spec.clusterIP}"
    ).stdout
    return redis.Redis(
        host=ip, port=6379, password=base64.b64decode(password).decode(), decode_responses=True
    )


def _echo_queue(plane: Any, name: str, stream: str) -> dict[str, Any]:
    """The example StreamQueue with the echo handler and one worker, as ``name`` on ``stream``; the
    operator is installed unless another test did."""
    if plane.kubectl("get", "deployment", "-n", q.OPERATOR_NAMESPACE, check=False).stdout.strip() == "":
        q.install_operator(plane)
    queue = q.example_queue(None, "http://127.0.0.1:9/", {"handler": "streamqueue.handlers.echo:handle"}, {})
    del queue["spec"]["worker"]["handlerUrl"]
    queue["metadata"]["name"] = name
    queue["spec"]["stream"] = stream
    queue["spec"]["scaling"] = {"minReplicas": 1, "maxReplicas": 1}
    assert queue["spec"]["redis"]["url"] == "redis://redis:6379/0"  # a name only pods can resolve
    return queue


def test_the_plugin_reaches_in_cluster_redis_through_a_pod(node_cluster: Node) -> None:
    plane = node_cluster.plane
    queue = _echo_queue(plane, QUEUE, STREAM)
    client = _redis(node_cluster)
    q.apply(plane, queue)
    for i in range(2):
        client.xadd(STREAM, {wire.MESSAGE: f"no user {i}"})  # dead-lettered by the worker

    def dead_letters() -> int:
        return kubectl_sq(node_cluster, "status", QUEUE)["redis"]["dead_letters"]

    eventually(lambda: dead_letters() == 2, "two dead letters seen through the pod", timeout=240, interval=2)
    listed = kubectl_sq(node_cluster, "dlq", "list", QUEUE)["dead_letters"]
    assert [d["reason"] for d in listed] == [wire.REASON_MISSING_USER_ID] * 2
    assert kubectl_sq(node_cluster, "dlq", "purge", QUEUE, "--all")["purged"] == 2
    assert client.xlen(f"{STREAM}:dead") == 0
    leftovers = plane.kubectl("get", "pods", "-n", q.NAMESPACE, "-o", "name").stdout
    assert f"{QUEUE}-sq-" not in leftovers  # every tool pod deleted once its log was read


ACL_QUEUE, ACL_STREAM = "sqacl", "sqacl_queue"
QUEUE_USER, TOOL_USER, TOOL_SECRET = "sqacl-queue", "sqacl-tool", "sqacl-tool"


def test_the_plugins_pod_runs_as_the_tool_user_under_the_generated_acl(node_cluster: Node) -> None:
    """The queue's workers and operator run as the least-privilege user ``python -m streamqueue.acl``
    prints for them, which cannot read dead letters; the plugin's pod, given the tool user's Secret by
    the StreamQueue's annotation, reads and purges them as that user, with no denial."""
    plane = node_cluster.plane
    queue = _echo_queue(plane, ACL_QUEUE, ACL_STREAM)
    admin = _redis(node_cluster)  # the default user, with the password of q.REDIS_SECRET
    acl_args = [
        "--stream",
        ACL_STREAM,
        "--no-model-calls",
        "--shared-user",
        QUEUE_USER,
        "--tool-user",
        TOOL_USER,
    ]
    passwords = create_generated_users(admin, *acl_args)
    create = ["create", "secret", "generic", "-n", q.NAMESPACE]
    plane.kubectl(*create, "sqacl-redis", f"--from-literal=password={passwords[QUEUE_USER]}")
    plane.kubectl(
        *create, TOOL_SECRET, "--type=kubernetes.io/basic-auth", f"--from-literal=username={TOOL_USER}",
        f"--from-literal=password={passwords[TOOL_USER]}",
    )  # fmt: skip
    queue["spec"]["redis"] |= {
        "username": QUEUE_USER,
        "passwordSecretRef": {"name": "sqacl-redis", "key": "password"},
    }
    q.apply(plane, queue)
    admin.xadd(ACL_STREAM, {wire.MESSAGE: "no user"})  # dead-lettered by the worker, as QUEUE_USER
    dead = wire.dead_letter_stream(ACL_STREAM)
    eventually(lambda: admin.xlen(dead) == 1, "the worker dead-letters as the queue's user", timeout=240)

    as_worker = run_plugin(node_cluster, "dlq", "list", ACL_QUEUE)
    assert as_worker.returncode == 1 and "xrange" in as_worker.stderr, as_worker.stderr
    plane.kubectl(
        "annotate", "streamqueue", ACL_QUEUE, "-n", q.NAMESPACE, f"{TOOL_REDIS_SECRET}={TOOL_SECRET}"
    )
    assert kubectl_sq(node_cluster, "status", ACL_QUEUE)["redis"]["dead_letters"] == 1
    [listed] = kubectl_sq(node_cluster, "dlq", "list", ACL_QUEUE)["dead_letters"]
    assert listed["reason"] == wire.REASON_MISSING_USER_ID
    assert kubectl_sq(node_cluster, "dlq", "purge", ACL_QUEUE, "--all")["purged"] == 1
    assert [
        e for e in admin.acl_log() if e["username"] in (QUEUE_USER, TOOL_USER) and e["object"] != "xrange"
    ] == []
