"""The product as a user meets it on a real node: `helm install`, `kubectl apply`, a burst, scale out and in.

Every pod runs from the images built here (`make images`) under containerd + runc, scheduled by
kube-scheduler and run by a real kubelet: the operator under the chart's ServiceAccount and RBAC,
reaching the API server through the `kubernetes` Service; the workers non-root, with a read-only root
filesystem, readiness and liveness probes, and their Redis password from a Secret. Redis runs as users
run it, a StatefulSet behind the Service `redis`, and the queue names it as the README example does,
`redis://redis:6379/0`: the workers find it through cluster DNS (CoreDNS, the `kube-dns` Service) and
the operator, in its own namespace, as `redis.default.svc`. Users write the article's wire format
to Redis; the workers' HTTP handler calls a model stand-in that takes half a second per message,
so the burst builds a backlog that needs many pods. Mid-burst a busy worker is deleted gracefully
and another forcibly; at the end the queue scales back to zero through the kubelet's SIGTERM.
Nothing may be lost, and every user must see exactly their own replies.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis
from streamqueue_harness import nodequeue as q
from streamqueue_harness.controlplane import REPO_ROOT
from streamqueue_harness.eventually import eventually
from streamqueue_harness.node import Node

# Its first test also starts the node (images import, kubelet) and may build the images on a cold run.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

USERS = [f"user-{i:02d}" for i in range(20)]
PER_USER = 40
# A pod serves 4 messages at a time, so 800 messages need many pods; a pod dead mid-message hands its
# entries to the others after 5 s; the queue may go back to zero 15 s after the backlog is gone.
WORKER = {"concurrency": 4, "claimIdleMs": 5000, "shutdownGraceSeconds": 20}
SCALING = {"scaleDownStabilizationSeconds": 5, "idleCooldownSeconds": 10}
REPORT = REPO_ROOT / ".cluster" / "e2e-node.txt"


@pytest.fixture
def cluster_redis(node_cluster: Node) -> Iterator[redis.Redis]:
    """The Redis StatefulSet and Service ``redis`` with its password in the Secret; a client for the test.

    The test reaches it through the Service's ClusterIP (kube-proxy's rules apply to the node's own
    processes too), as pods do; only the name is theirs alone.
    """
    client = q.redis_in_cluster(node_cluster.plane, node_cluster.images.redis)
    yield client
    client.close()


def _two_busy_workers(client: redis.Redis, ready: set[str]) -> list[str] | None:
    """Two Ready worker pods whose consumers hold pending entries: deleting them interrupts work."""
    consumers = cast(list[dict[str, Any]], client.xinfo_consumers(q.STREAM, "ai_service_group"))
    busy = [c["name"] for c in consumers if c["pending"] > 0 and c["name"] in ready]
    return busy[:2] if len(busy) >= 2 else None


def _all_answered(client: redis.Redis, expected: dict[str, int]) -> bool:
    return all(client.xlen(f"{q.REPLY_PREFIX}{user}") >= count for user, count in expected.items())


def test_helm_install_burst_scales_out_and_back_to_zero_losing_nothing(
    node_cluster: Node, cluster_redis: redis.Redis, node_model: q.ModelStandIn
) -> None:
    plane = node_cluster.plane
    client = cluster_redis
    q.install_operator(plane)
    queue = q.example_queue(None, node_model.url, WORKER, SCALING)
    assert queue["spec"]["redis"]["url"] == "redis://redis:6379/0"
    q.apply(plane, queue)
    pods = q.PodWatch(plane)
    plane.kubectl("wait", "--for=create", f"deployment/{q.DEPLOYMENT}", "-n", q.NAMESPACE, "--timeout=60s")

    # The first message finds no worker at all: operator, scheduler, kubelet and container start.
    q.send(client, [(USERS[0], "cold", "hello from zero")])
    cold_start_s = q.await_reply(client, USERS[0], "cold", timeout_s=120)

    burst_at = time.monotonic()
    requests = [(user, f"{user}#{n}", f"message {n} from {user}") for n in range(PER_USER) for user in USERS]
    q.send(client, requests)
    pods.wait("three Ready workers", lambda w: len(w.ready) >= 3, timeout_s=180)
    assert q.get_queue_row(plane)["READY"] == "True"

    busy = eventually(lambda: _two_busy_workers(client, pods.ready), "two busy Ready workers", timeout=60)
    plane.kubectl("delete", "pod", busy[0], "-n", q.NAMESPACE, "--wait=false")
    plane.kubectl("delete", "pod", busy[1], "-n", q.NAMESPACE, "--grace-period=0", "--force")

    expected = {user: PER_USER + (user == USERS[0]) for user in USERS}
    eventually(lambda: _all_answered(client, expected), "every reply", timeout=300, interval=0.5)
    drained_s = time.monotonic() - burst_at
    scale_out_s = pods.max_ready_at - burst_at

    request_ids = {request_id: user for user, request_id, _ in requests}
    lost = foreign = duplicates = 0
    for user in USERS:
        replies = q.replies(client, user)
        counts = Counter(r.get("request_id") for r in replies)
        duplicates += sum(n - 1 for n in counts.values())
        foreign += sum(
            1
            for r in replies
            if r.get("request_id") not in (None, "cold") and request_ids.get(r["request_id"]) != user
        )
        foreign += sum(1 for r in replies if not r["response"].startswith(f"reply to {user}: "))
        lost += sum(1 for rid, owner in request_ids.items() if owner == user and counts[rid] == 0)
    assert (lost, foreign, duplicates) == (0, 0, 0)
    assert client.xlen(f"{q.STREAM}:dead") == 0

    pods.wait("scale back to zero", lambda w: not w.alive, timeout_s=240)
    zero_s = time.monotonic() - burst_at
    pods.stop()
    graceful = {pod: code for pod, code in pods.exit_codes.items() if pod != busy[1]}
    assert graceful and set(graceful.values()) == {0}, f"exit codes of SIGTERMed workers: {graceful}"
    # Scale-in went down in steps: before each, the operator ranked the pods for the ReplicaSet.
    assert pods.deletion_costs, "no pod-deletion-cost was set on the real node's pods before a scale-down"
    assert q.get_queue_row(plane)["REPLICAS"] == "0/0"

    total = len(requests) + 1
    summary = (
        f"e2e-node passed: {total} messages, {len(USERS)} users, lost={lost}, duplicates={duplicates}, "
        f"foreign={foreign}, first reply from zero {cold_start_s:.1f}s, peak {pods.max_ready} Ready workers "
        f"{scale_out_s:.1f}s after the burst, drained in {drained_s:.1f}s, back to 0 at {zero_s:.1f}s, "
        f"{len(graceful)} SIGTERMed workers exited 0"
    )
    print(f"\n{summary}")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(summary + "\n")  # `make e2e-node` prints it as its last line
