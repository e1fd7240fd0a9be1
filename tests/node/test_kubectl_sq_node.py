"""``kubectl sq`` on the real node, where Redis is reachable only inside the cluster: the queue names
it ``redis://redis:6379/0`` (cluster DNS) with its password in a Secret, and the plugin, without
``--direct``, runs its Redis side in a pod from the worker image with the worker Deployment's
environment (``kubectl run --rm -i``), as a user's machine outside the cluster would have to.
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
from streamqueue_harness import nodequeue as q
from streamqueue_harness.eventually import eventually
from streamqueue_harness.node import Node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PLUGIN = Path(sys.executable).parent / "kubectl-sq"
QUEUE, STREAM = "sqtool", "sqtool_queue"


def kubectl_sq(node: Node, *argv: str) -> Any:
    env = {**os.environ, "KUBECTL": str(node.plane.bin_dir / "kubectl")}
    scope = ["--kubeconfig", str(node.plane.kubeconfig), "-n", q.NAMESPACE, "-o", "json"]
    done = subprocess.run(
        [str(PLUGIN), *argv, *scope], env=env, capture_output=True, text=True, timeout=300, check=False
    )
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


def test_the_plugin_reaches_in_cluster_redis_through_a_pod(node_cluster: Node) -> None:
    plane = node_cluster.plane
    if plane.kubectl("get", "deployment", "-n", q.OPERATOR_NAMESPACE, check=False).stdout.strip() == "":
        q.install_operator(plane)
    client = _redis(node_cluster)
    queue = q.example_queue(None, "http://127.0.0.1:9/", {"handler": "streamqueue.handlers.echo:handle"}, {})
    del queue["spec"]["worker"]["handlerUrl"]
    queue["metadata"]["name"] = QUEUE
    queue["spec"]["stream"] = STREAM
    queue["spec"]["scaling"] = {"minReplicas": 1, "maxReplicas": 1}
    assert queue["spec"]["redis"]["url"] == "redis://redis:6379/0"  # a name only pods can resolve
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
    assert f"{QUEUE}-sq-" not in leftovers  # every tool pod removed (kubectl run --rm)
