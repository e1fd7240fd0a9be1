"""The product on two nodes as users run it, through the failures a cluster has (issue 19).

Two real nodes (containerd + kubelet + kube-proxy each; the second in a network namespace of its own,
joined by a veth pair) under one control plane; CoreDNS and the Redis StatefulSet on the first node.
The HA operator is installed with the README's `helm install` (two replicas, spread over the nodes),
then the example queue takes a burst from 20 users while, in order: the leader's operator container
is SIGKILLed (every process in its cgroup on the node: `kubectl delete --grace-period=0` would still
send SIGTERM first, and the leader would release its Lease), the new leader is frozen (SIGSTOP) until
the standby has taken the Lease and written, then resumed (SIGCONT): nothing is written under its
identity after its lease expired (managedFields, by field manager), the workers are rolled
(`spec.worker.env` changed), and the second node is drained (`kubectl drain`: the workers' and the
operator's budgets respected, workers drain on SIGTERM). Every request must be answered exactly once
on its user's stream. Then, with the queue back at zero and the leader moved to the second node, that
node is stopped (kubelet, containerd, kube-proxy and every pod process killed; the control plane
stays): a new message must still wake the queue (the standby takes the Lease after its lease
duration; the woken worker may be placed on the lost node, which looks Ready until the node-monitor
grace period ends, so the queue's workers tolerate its taints for 0 s and are replaced once it is
NotReady) and the queue must go back to zero; the lost node turns NotReady and its operator replica
is evicted.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from streamqueue_harness import nodequeue as q
from streamqueue_harness.controlplane import REPO_ROOT, ControlPlane
from streamqueue_harness.eventually import eventually
from streamqueue_harness.netns import in_private_namespaces
from streamqueue_harness.node import Node, running_cluster
from streamqueue_harness.operatorha import (
    LOST_NODE_TOLERATIONS,
    chart_timing,
    frozen_operator,
    leader_identity,
    metric,
    move_leader_to,
    new_leader,
    not_ready_since,
    operator_pods,
    queue_writers,
    sigkill_operator,
    standby_campaigning,
)

pytestmark = [pytest.mark.slow, pytest.mark.kube, pytest.mark.node, pytest.mark.timeout(1800)]

USERS = [f"user-{i:02d}" for i in range(20)]
PER_USER = 40
WORKER = {
    "concurrency": 4,
    "claimIdleMs": 5000,
    "shutdownGraceSeconds": 20,
    "tolerations": LOST_NODE_TOLERATIONS,
}
SCALING = {"scaleDownStabilizationSeconds": 5, "idleCooldownSeconds": 10}
METRICS_PORT = 9090  # the chart's metrics.port
REPORT = REPO_ROOT / ".cluster" / "e2e-cluster.txt"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    """Control plane + two nodes for this module only: its last steps drain and kill a node.

    Module scope, not the session's ``node_cluster``: the two may not run at once (both use the
    first node's bridge in the run's namespace); pytest collects tests/cluster before tests/node.
    """
    if not in_private_namespaces():
        pytest.fail("the real nodes need root: the session runs them in namespaces of its own", pytrace=False)
    with running_cluster(tmp_path_factory.mktemp("cluster"), nodes=2) as started:
        yield started


@pytest.fixture
def cluster_redis(nodes: list[Node]) -> Iterator[redis.Redis]:
    """Redis (StatefulSet + Service ``redis``) on the first node, the one this test never drains or stops."""
    client = q.redis_in_cluster(nodes[0].plane, nodes[0].images.redis, node=nodes[0].name)
    yield client
    client.close()


# ---- nodes ------------------------------------------------------------------------------------------------


def worker_nodes(plane: ControlPlane) -> set[str]:
    return set(
        plane.kubectl(
            "get", "pods", "-n", q.NAMESPACE, "-l", q.POD_SELECTOR, "-o", "jsonpath={.items[*].spec.nodeName}"
        ).stdout.split()
    )


def scaled_to_zero(plane: ControlPlane) -> bool:
    jsonpath = "jsonpath={.spec.replicas}"
    return plane.kubectl("get", "deployment", q.DEPLOYMENT, "-n", q.NAMESPACE, "-o", jsonpath).stdout == "0"


def all_answered(client: redis.Redis, expected: Counter[str]) -> bool:
    return all(client.xlen(f"{q.REPLY_PREFIX}{user}") >= count for user, count in expected.items())


def count_replies(client: redis.Redis, sent: dict[str, str]) -> tuple[int, int]:
    """(lost, duplicates) over every request sent: ``sent`` maps request id -> user."""
    lost = duplicates = 0
    for user in USERS:
        counts = Counter(r.get("request_id") for r in q.replies(client, user))
        duplicates += sum(n - 1 for n in counts.values())
        lost += sum(1 for rid, owner in sent.items() if owner == user and counts[rid] == 0)
        assert all(rid is None or sent.get(rid) == user for rid in counts), f"foreign reply for {user}"
    return lost, duplicates


def freeze_the_leader(plane: ControlPlane, nodes: list[Node]) -> tuple[float, int]:
    """SIGSTOP the leader's operator container until the standby has taken the Lease and written, then
    SIGCONT. Returns (seconds frozen, writes its fence refused after it resumed); fails if its identity
    wrote anything after its lease expired (managedFields of the Deployment, the StreamQueue and the
    worker Pods, counted by field manager: one per process identity)."""
    eventually(lambda: standby_campaigning(plane), "a standby campaigning", timeout=120)
    frozen = leader_identity(plane)
    pod = frozen.rsplit("_", 1)[0]
    address = operator_pods(plane)[pod]["ip"]
    with frozen_operator(plane, nodes, pod):
        stopped, stopped_wall = time.monotonic(), datetime.now(UTC)
        taker = eventually(
            lambda: new_leader(plane, frozen), "a leader while the old one is frozen", timeout=60
        )
        since = stopped_wall.replace(microsecond=0)
        eventually(
            lambda: queue_writers(plane).get(taker, since) > since, "the new leader writing", timeout=60
        )
        frozen_s = time.monotonic() - stopped
    assert frozen_s > chart_timing()["leaseDuration"], "not frozen for longer than the lease"
    # Resumed: its elector finds the Lease taken; its queue loops' next writes meet the closed fence.
    gauge = ("streamqueue_operator_leader", {})
    eventually(lambda: metric(METRICS_PORT, *gauge, host=address) == 0, "the resumed leader standing by")
    expired = (stopped_wall + timedelta(seconds=chart_timing()["leaseDuration"])).replace(microsecond=0)
    late = {who: at for who, at in queue_writers(plane).items() if at >= expired}
    assert frozen not in late, f"the frozen leader wrote after its lease expired: {late}"
    refused = metric(METRICS_PORT, "streamqueue_operator_writes_total", {"outcome": "refused"}, host=address)
    return frozen_s, int(refused or 0)


def test_two_nodes_leader_killed_rollout_drain_and_node_lost_lose_nothing(
    nodes: list[Node], cluster_redis: redis.Redis, node_model: q.ModelStandIn
) -> None:
    plane = nodes[0].plane
    first, second = nodes[0].name, nodes[1].name
    client = cluster_redis
    q.install_operator(plane)
    replicas = operator_pods(plane)
    assert {p["node"] for p in replicas.values()} == {first, second}, f"replicas not spread: {replicas}"
    q.apply(plane, q.example_queue(None, node_model.url, WORKER, SCALING))
    pods = q.PodWatch(plane)
    plane.kubectl("wait", "--for=create", f"deployment/{q.DEPLOYMENT}", "-n", q.NAMESPACE, "--timeout=60s")
    sent: dict[str, str] = {}

    # A burst from 20 users; once workers run on both nodes, the leader's pod is killed outright.
    requests = [(user, f"{user}#{n}", f"message {n} from {user}") for n in range(PER_USER) for user in USERS]
    sent.update({request_id: user for user, request_id, _ in requests})
    burst_at = time.monotonic()
    q.send(client, requests)
    pods.wait("two Ready workers", lambda w: len(w.ready) >= 2, timeout_s=180)
    leader = leader_identity(plane)
    killed_at = time.monotonic()
    sigkill_operator(plane, nodes, leader.rsplit("_", 1)[0])
    eventually(lambda: new_leader(plane, leader), "a new operator leader", timeout=60, interval=0.2)
    failover_s = time.monotonic() - killed_at
    # Still mid-burst: the new leader frozen for longer than its lease, then resumed.
    frozen_s, refused = freeze_the_leader(plane, nodes)

    # Mid-burst: a worker rollout (a template field changes), then the second node is drained.
    patch = {"spec": {"worker": {"env": [{"name": "E2E_ROLLOUT", "value": "1"}]}}}
    plane.kubectl("patch", "sq", q.QUEUE, "-n", q.NAMESPACE, "--type=merge", "-p", json.dumps(patch))
    plane.kubectl(
        "rollout", "status", f"deployment/{q.DEPLOYMENT}", "-n", q.NAMESPACE, "--timeout=180s", timeout=240
    )
    rolled_by_s = time.monotonic() - burst_at
    busy_at_drain = worker_nodes(plane)
    assert second in busy_at_drain, f"no worker on {second} to drain: {busy_at_drain}"
    plane.kubectl(
        "drain", second, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=180s", timeout=240
    )
    assert worker_nodes(plane) <= {first}, "workers left on the drained node"
    expected = Counter(sent.values())
    eventually(lambda: all_answered(client, expected), "every reply of the burst", timeout=300, interval=0.5)
    drained_s = time.monotonic() - burst_at
    lost, duplicates = count_replies(client, sent)
    assert lost == 0, f"{lost} requests lost in the burst"
    plane.kubectl("uncordon", second)

    # The queue at zero, the leader on the second node: the node is lost, a new message must wake it.
    move_leader_to(plane, second)
    eventually(lambda: standby_campaigning(plane), "a standby campaigning", timeout=120)
    leader = leader_identity(plane)
    pods.wait("the queue back at zero", lambda w: not w.alive, timeout_s=240)
    lost_at, lost_wall = time.monotonic(), time.time()
    nodes[1].stop()
    q.send(client, [(USERS[0], "after-node-loss", "anyone there?")])
    sent["after-node-loss"] = USERS[0]
    q.await_reply(client, USERS[0], "after-node-loss", timeout_s=120)
    wake_s = time.monotonic() - lost_at  # from the moment the node began to stop
    assert new_leader(plane, leader), "the reply came, but the leader is the lost node's replica"
    not_ready_s = (
        eventually(lambda: not_ready_since(plane, second), f"{second} NotReady", timeout=60) - lost_wall
    )
    # Zero by the operator's decision: the first worker woken may have been placed on the lost node,
    # and a pod there stays Terminating after its eviction (no kubelet confirms it stopped).
    eventually(lambda: scaled_to_zero(plane), "the queue back at zero after the wake", timeout=240)
    pods.wait("no Ready worker", lambda w: not w.ready, timeout_s=60)
    # The chart's 30 s toleration for unreachable: the lost replica is evicted and replaced on the first.
    eventually(
        lambda: [p for p in operator_pods(plane).values() if p["node"] == first and p["ready"]][1:],
        "two Ready operator replicas on the remaining node",
        timeout=180,
    )
    replaced_s = time.monotonic() - lost_at
    pods.stop()

    lost, duplicates = count_replies(client, sent)
    assert lost == 0
    assert client.xlen(f"{q.STREAM}:dead") == 0
    summary = (
        f"e2e-cluster passed: {len(sent)} messages, lost={lost}, duplicates={duplicates}, "
        f"leader failover {failover_s:.1f}s, wake with the leader's node lost {wake_s:.1f}s, "
        f"rollout lost=0 (done {rolled_by_s:.1f}s into the burst), "
        f"drain lost=0 (workers on {len(busy_at_drain)} nodes before, burst answered in {drained_s:.1f}s), "
        f"peak {pods.max_ready} Ready workers, lost node NotReady after {not_ready_s:.0f}s, "
        f"its operator replica replaced after {replaced_s:.1f}s, "
        f"frozen leader wrote 0 after its lease expired (frozen {frozen_s:.1f}s, {refused} writes refused)"
    )
    print(f"\n{summary}")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(summary + "\n")
