"""Cold start on the real node: first message at zero replicas to its reply; a burst to full scale-out.

Everything is real: `helm install` puts the operator in a pod; the worker pods start from the image
built here under containerd + runc, placed by kube-scheduler, run by the kubelet. The baseline, in the
same run, is the platform's floor without the operator: a bare Pod with the worker Deployment's own
template, from `kubectl create` to Ready (scheduler, kubelet, sandbox, container start, the worker's
first readiness probe). KEDA's redis-streams scaler, for comparison, polls every 30 s by default
before the first pod is even requested. Figures only; nothing is asserted.

    python -m bench.node_coldstart [--trials 5]     (root; builds the images if needed)
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from streamqueue_harness import nodequeue as q
from streamqueue_harness.netns import enter_private_namespaces, in_private_namespaces
from streamqueue_harness.node import NODE_IP, Node, running_node
from streamqueue_harness.redis_server import RedisServer

from bench.common import print_table

USERS = 20
BURST = 800
WORKER = {"concurrency": 4}
SCALING = {"scaleDownStabilizationSeconds": 2, "idleCooldownSeconds": 3}


def _bare_pod_ready_seconds(node: Node, trial: int) -> float:
    """A Pod from the worker Deployment's template, created by hand: kubectl create → Ready."""
    plane = node.plane
    deployment = json.loads(
        plane.kubectl("get", "deployment", q.DEPLOYMENT, "-n", q.NAMESPACE, "-o", "json").stdout
    )
    template = deployment["spec"]["template"]
    name = f"baseline-{trial}"
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"bench": "baseline"}},
        "spec": template["spec"],
    }
    began = time.monotonic()
    plane.kubectl("create", "-n", q.NAMESPACE, "-f", "-", input=json.dumps(pod))
    plane.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "-n", q.NAMESPACE, "--timeout=120s")
    ready = time.monotonic() - began
    plane.kubectl("delete", "pod", name, "-n", q.NAMESPACE, "--wait=true", "--timeout=120s")
    return ready


def _cold_reply_seconds(node: Node, pods: q.PodWatch, client: Any, trial: int) -> float:
    """Wait for zero workers, then time one message to its reply."""
    pods.wait("zero workers", lambda w: not w.alive, timeout_s=180)
    q.send(client, [("cold-user", f"cold-{trial}", "hello from zero")])
    return q.await_reply(client, "cold-user", f"cold-{trial}", timeout_s=120)


def _scale_out_seconds(pods: q.PodWatch, client: Any) -> tuple[float, int]:
    """A burst at zero workers: seconds until the most workers were Ready at once, and how many."""
    pods.wait("zero workers", lambda w: not w.alive, timeout_s=180)
    pods.max_ready = 0
    began = time.monotonic()
    q.send(client, [(f"user-{i % USERS}", f"burst-{i}", f"message {i}") for i in range(BURST)])
    pods.wait("the burst answered", lambda w: w.max_ready > 0 and not w.ready, timeout_s=300)
    return pods.max_ready_at - began, pods.max_ready


def measure(trials: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sq-bench-node-"))
    with (
        running_node(workdir) as node,
        RedisServer(password=secrets.token_hex(16), also_bind=(NODE_IP,)) as redis_server,
    ):
        model = q.ModelStandIn(NODE_IP, delay_s=0.5)
        began = time.monotonic()
        q.install_operator(node.plane)
        installed = time.monotonic() - began
        q.create_redis_secret(node.plane, str(redis_server.password))
        redis_url = f"redis://{NODE_IP}:{redis_server.port}/0"
        q.apply(node.plane, q.example_queue(redis_url, model.url, WORKER, SCALING))
        pods = q.PodWatch(node.plane)
        client = redis_server.client(decode_responses=True)
        cold = [_cold_reply_seconds(node, pods, client, t) for t in range(trials)]
        bare = [_bare_pod_ready_seconds(node, t) for t in range(trials)]
        scale_out, peak = _scale_out_seconds(pods, client)
        pods.stop()
        model.close()
    print(
        f"node Ready in {node.start_seconds:.1f}s (containerd, {len(node.images.archives)} images imported, "
        "kubelet, cluster DNS answering); "
        f"helm install {installed:.1f}s"
    )
    rows = [
        ("first message at 0 replicas → its reply", statistics.median(cold), max(cold), trials),
        ("baseline: bare worker Pod → Ready", statistics.median(bare), max(bare), trials),
    ]
    print_table(["measure (seconds)", "median", "max", "trials"], rows)
    ratio = statistics.median(cold) / statistics.median(bare)
    print(
        f"cold-start reply / bare pod Ready: {ratio:.2f}x "
        "(the rest is the operator's share: detection, Deployment, ReplicaSet, the reply itself)"
    )
    print(f"burst of {BURST} messages at 0 replicas → {peak} Ready workers in {scale_out:.1f}s")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench node_coldstart", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args(argv)
    if in_private_namespaces():
        measure(args.trials)
    elif os.geteuid() != 0:
        print("skipped: the real node needs root")
    else:  # a fresh process: namespaces can only be entered while single-threaded
        subprocess.run([sys.executable, "-m", "bench.node_coldstart", *argv], check=True)


if __name__ == "__main__":
    if os.geteuid() == 0 and not in_private_namespaces():
        enter_private_namespaces()
    main(sys.argv[1:])
