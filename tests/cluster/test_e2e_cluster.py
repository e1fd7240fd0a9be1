"""The product on two nodes as users run it, through the failures a cluster has (issue 19).

Two real nodes (containerd + kubelet + kube-proxy each; the second in a network namespace of its own,
joined by a veth pair) under one control plane; CoreDNS and the Redis StatefulSet on the first node.
The HA operator is installed with the README's `helm install` (two replicas, spread over the nodes),
then the example queue takes a burst from 20 users while, in order: the leader's operator container
is SIGKILLed (every process in its cgroup on the node: `kubectl delete --grace-period=0` would still
send SIGTERM first, and the leader would release its Lease), the workers are rolled
(`spec.worker.env` changed), and the second node is drained (`kubectl drain`: the workers' and the
operator's budgets respected, workers drain on SIGTERM). Every request must be answered exactly once
on its user's stream. Then, with the queue back at zero and the leader moved to the second node, that
node is stopped (kubelet, containerd, kube-proxy and every pod process killed; the control plane
stays): a new message must still wake the queue (the standby takes the Lease after its lease
duration) and the queue must go back to zero; the lost node turns NotReady and its operator replica
is evicted.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import redis
from streamqueue_harness import nodequeue as q
from streamqueue_harness.controlplane import REPO_ROOT, ControlPlane
from streamqueue_harness.eventually import eventually
from streamqueue_harness.netns import in_private_namespaces
from streamqueue_harness.node import Node, running_cluster
from streamqueue_harness.node.host import kill_container

pytestmark = [pytest.mark.slow, pytest.mark.kube, pytest.mark.node, pytest.mark.timeout(1800)]

USERS = [f"user-{i:02d}" for i in range(20)]
PER_USER = 40
WORKER = {"concurrency": 4, "claimIdleMs": 5000, "shutdownGraceSeconds": 20}
SCALING = {"scaleDownStabilizationSeconds": 5, "idleCooldownSeconds": 10}
OPERATOR_PODS = f"app.kubernetes.io/instance={q.RELEASE}"
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


# ---- the operator's replicas and its Lease ------------------------------------------------------------


def operator_pods(plane: ControlPlane) -> dict[str, dict[str, Any]]:
    """The operator's pods that are not being deleted: name -> {node, ready}."""
    listing = json.loads(
        plane.kubectl("get", "pods", "-n", q.OPERATOR_NAMESPACE, "-l", OPERATOR_PODS, "-o", "json").stdout
    )
    pods = {}
    for pod in listing["items"]:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        conditions = pod.get("status", {}).get("conditions", [])
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        pods[pod["metadata"]["name"]] = {"node": pod["spec"].get("nodeName"), "ready": ready}
    return pods


def leader_identity(plane: ControlPlane) -> str:
    """The holder of the operator's Lease, `<pod>_<random>` (new per process); "" if none."""
    return plane.kubectl(
        "get", "lease", "-n", q.OPERATOR_NAMESPACE, "-o", "jsonpath={.items[0].spec.holderIdentity}"
    ).stdout


def leader_pod(plane: ControlPlane) -> str:
    return leader_identity(plane).rsplit("_", 1)[0]


def new_leader(plane: ControlPlane, old_identity: str) -> str | None:
    """A holder other than ``old_identity`` (another pod, or the same pod's restarted container)."""
    identity = leader_identity(plane)
    return identity if identity not in ("", old_identity) else None


def sigkill_operator(plane: ControlPlane, nodes: list[Node], pod: str) -> None:
    """SIGKILL the operator container of ``pod`` on its node, as a crash or the OOM killer would."""
    status = json.loads(plane.kubectl("get", "pod", pod, "-n", q.OPERATOR_NAMESPACE, "-o", "json").stdout)
    node = next(n for n in nodes if n.name == status["spec"]["nodeName"])
    container_id = status["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    assert kill_container(node.cgroup_root, container_id) > 0, f"no process of {pod} on {node.name}"


def two_ready_replicas(plane: ControlPlane) -> dict[str, dict[str, Any]] | None:
    pods = operator_pods(plane)
    return pods if len(pods) == 2 and all(p["ready"] for p in pods.values()) else None


def move_leader_to(plane: ControlPlane, node: str) -> None:
    """Graceful deletions until the leader runs on ``node``: a standby there first (anti-affinity
    places a replacement on the node without a replica), then the leader releases its Lease on
    SIGTERM and that standby takes it."""
    for _ in range(4):
        leader = eventually(lambda: leader_pod(plane) or None, "an operator leader", timeout=60)
        pods = eventually(lambda: two_ready_replicas(plane), "two Ready operator replicas", timeout=120)
        if pods[leader]["node"] == node:
            return
        standby = next(name for name in pods if name != leader)
        victim = leader if pods[standby]["node"] == node else standby
        plane.kubectl("delete", "pod", victim, "-n", q.OPERATOR_NAMESPACE)
        eventually(lambda: leader_pod(plane) != victim, f"the Lease not held by {victim}", timeout=60)  # noqa: B023
    raise AssertionError(f"the operator's leader did not move to {node}")


# ---- nodes ------------------------------------------------------------------------------------------------


def not_ready_since(plane: ControlPlane, name: str) -> float | None:
    """When the node's Ready condition last turned from True (Unix time, whole seconds), if not True now."""
    node = json.loads(plane.kubectl("get", "node", name, "-o", "json").stdout)
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    if ready["status"] == "True":
        return None
    return datetime.fromisoformat(ready["lastTransitionTime"]).timestamp()


def worker_nodes(plane: ControlPlane) -> set[str]:
    return set(
        plane.kubectl(
            "get", "pods", "-n", q.NAMESPACE, "-l", q.POD_SELECTOR, "-o", "jsonpath={.items[*].spec.nodeName}"
        ).stdout.split()
    )


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
    pods.wait("the queue back at zero after the wake", lambda w: not w.alive, timeout_s=240)
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
        f"its operator replica replaced after {replaced_s:.1f}s"
    )
    print(f"\n{summary}")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(summary + "\n")
