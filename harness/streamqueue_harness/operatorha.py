"""The HA operator under test: its replicas, its Lease, and the failures done to them.

Shared by the HA tests and ``bench.ha`` so the tests' assertions and the benchmark's figures come
from the same machinery. Two settings, one section each:

- **Processes on the local control plane** (``Replica``, ``replicas``): real ``streamqueue_operator``
  processes, no pods; a kill is ``kill -9`` of the process, a freeze SIGSTOP.
- **Pods on the real nodes** (``operator_pods`` ... ``freeze_container``): the chart's replicas as
  ``helm install`` runs them; a kill is SIGKILL of every process in the container's cgroup on its
  node, as a crash or the OOM killer ends it.

Which replica wrote is read from the API server itself: each operator process writes with its own
field manager, ``streamqueue-operator_<identity>``, recorded in the objects' managedFields.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from . import nodequeue as q
from .controlplane import ControlPlane
from .eventually import eventually
from .helm import CHART
from .node import Node
from .node.host import container_pids, kill_container
from .operatorproc import OperatorProcess
from .ports import free_port

MANAGER_PREFIX = "streamqueue-operator_"
OPERATOR_PODS = f"app.kubernetes.io/instance={q.RELEASE}"
# spec.worker.tolerations for a queue that must wake while a node is lost: a worker the new leader
# starts right after the loss may be placed on that node (it looks Ready until the node-monitor grace
# period ends); NoExecute tolerations of 0 s let the taint eviction replace it as soon as the node is
# NotReady, instead of after DefaultTolerationSeconds' 300 s (docs/ha.md, "A node lost").
LOST_NODE_TOLERATIONS = [
    {
        "key": f"node.kubernetes.io/{taint}",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 0,
    }
    for taint in ("unreachable", "not-ready")
]


def chart_timing() -> dict[str, float]:
    """The chart's default ``leaderElection`` timings: what a user installs, so what is measured."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())["leaderElection"]
    return {key: float(values[key]) for key in ("leaseDuration", "renewDeadline", "retryPeriod")}


def timing_args(timing: dict[str, float]) -> tuple[str, ...]:
    return (
        f"--lease-duration={timing['leaseDuration']:g}",
        f"--renew-deadline={timing['renewDeadline']:g}",
        f"--retry-period={timing['retryPeriod']:g}",
    )


def metric(port: int, sample_name: str, labels: dict[str, str], host: str = "127.0.0.1") -> float | None:
    """One sample from an operator's /metrics, or None if it has not been recorded."""
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def writers(objects: Sequence[dict[str, Any]]) -> dict[str, datetime]:
    """Operator identity -> time of its last write (whole seconds), over the objects' managedFields."""
    out: dict[str, datetime] = {}
    for obj in objects:
        for entry in obj.get("metadata", {}).get("managedFields") or []:
            manager = entry.get("manager") or ""
            if manager.startswith(MANAGER_PREFIX) and entry.get("time"):
                at = datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))
                identity = manager.removeprefix(MANAGER_PREFIX)
                out[identity] = max(at, out.get(identity, at))
    return out


# ---- processes on the local control plane -------------------------------------------------------------


class Replica:
    """One operator process with its own metrics port and log directory."""

    def __init__(self, plane: Any, namespace: str, directory: Path, timing: Sequence[str]) -> None:
        self.port = free_port()
        args = ("--status-min-interval=1", f"--metrics-port={self.port}", *timing)
        self.proc = OperatorProcess(plane.kubeconfig, f"--namespace={namespace}", directory, *args)

    def leading(self) -> bool:
        try:
            return metric(self.port, "streamqueue_operator_leader", {}) == 1
        except OSError:  # its metrics server is not up yet
            return False

    def identity(self) -> str:
        """From the log line the elector writes at start (the current run's: the identity is new per
        process)."""
        line = next(x for x in reversed(self.proc.logs().splitlines()) if "leader election: " in x)
        return line.split("leader election: ")[1].split(" on Lease")[0]

    def campaigning(self) -> bool:
        """Started and campaigning: its metrics answer and the current run's elector has logged."""
        try:
            metric(self.port, "streamqueue_operator_leader", {})
        except OSError:
            return False
        return self.proc.log_path.exists() and "leader election: " in self.proc.log_path.read_text()


@contextmanager
def replicas(
    plane: Any, namespace: str, directory: Path, count: int, timing: Sequence[str]
) -> Iterator[list[Replica]]:
    """``count`` operator processes watching ``namespace``; each stopped after (a paused one resumed)."""
    started = [Replica(plane, namespace, directory / f"replica-{i}", timing) for i in range(count)]
    try:
        for replica in started:
            replica.proc.start()
        yield started
    finally:
        for replica in started:
            if replica.proc.proc is not None and replica.proc.proc.poll() is None:
                os.kill(replica.proc.pid, signal.SIGCONT)  # a paused one must be able to stop
                replica.proc.stop()


def elected(group: list[Replica], timeout: float = 30) -> tuple[Replica, list[Replica]]:
    """The one leader and the standbys; fails if two lead at once."""
    leaders = eventually(lambda: [r for r in group if r.leading()], "a leader", timeout=timeout)
    assert len(leaders) == 1, "two replicas lead at once"
    return leaders[0], [r for r in group if r is not leaders[0]]


# ---- pods on the real nodes ---------------------------------------------------------------------------


def operator_pods(plane: ControlPlane) -> dict[str, dict[str, Any]]:
    """The operator's pods that are not being deleted: name -> {node, ready, ip}."""
    listing = json.loads(
        plane.kubectl("get", "pods", "-n", q.OPERATOR_NAMESPACE, "-l", OPERATOR_PODS, "-o", "json").stdout
    )
    pods = {}
    for pod in listing["items"]:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        status = pod.get("status", {})
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
        pods[pod["metadata"]["name"]] = {
            "node": pod["spec"].get("nodeName"),
            "ready": ready,
            "ip": status.get("podIP"),
        }
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


def _container(plane: ControlPlane, nodes: list[Node], pod: str) -> tuple[Node, str]:
    """The node running ``pod`` and its operator container's id."""
    status = json.loads(plane.kubectl("get", "pod", pod, "-n", q.OPERATOR_NAMESPACE, "-o", "json").stdout)
    node = next(n for n in nodes if n.name == status["spec"]["nodeName"])
    return node, status["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]


def sigkill_operator(plane: ControlPlane, nodes: list[Node], pod: str) -> None:
    """SIGKILL the operator container of ``pod`` on its node, as a crash or the OOM killer would."""
    node, container_id = _container(plane, nodes, pod)
    assert kill_container(node.cgroup_root, container_id) > 0, f"no process of {pod} on {node.name}"


@contextmanager
def frozen_operator(plane: ControlPlane, nodes: list[Node], pod: str) -> Iterator[None]:
    """SIGSTOP every process of ``pod``'s operator container for the block (a VM or GC pause), SIGCONT
    after. The processes are found in the container's cgroup on its node, as ``sigkill_operator`` does."""
    node, container_id = _container(plane, nodes, pod)
    pids = container_pids(node.cgroup_root, container_id)
    assert pids, f"no process of {pod} on {node.name}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def standby_campaigning(plane: ControlPlane) -> bool:
    """Two Ready replicas, and the one not leading has started its elector (its log says so): Ready
    comes when the container starts, seconds before a loaded node has imported kopf and campaigns."""
    pods, leader = two_ready_replicas(plane), leader_pod(plane)
    standbys = [name for name in pods or {} if name != leader]
    if not leader or len(standbys) != 1:
        return False
    log = plane.kubectl("logs", standbys[0], "-n", q.OPERATOR_NAMESPACE, check=False).stdout
    return "leader election: " in log


def two_ready_replicas(plane: ControlPlane) -> dict[str, dict[str, Any]] | None:
    pods = operator_pods(plane)
    return pods if len(pods) == 2 and all(p["ready"] for p in pods.values()) else None


def move_leader_to(plane: ControlPlane, node: str) -> None:
    """Graceful deletions until the leader runs on ``node``: a standby there first (anti-affinity
    places a replacement on the node without a replica), then the leader releases its Lease on
    SIGTERM and that standby takes it."""
    for _ in range(4):
        leader = eventually(lambda: leader_pod(plane), "an operator leader", timeout=60)
        pods = eventually(lambda: two_ready_replicas(plane), "two Ready operator replicas", timeout=120)
        assert pods is not None  # eventually returns a truthy value
        if pods[leader]["node"] == node:
            return
        standby = next(name for name in pods if name != leader)
        victim = leader if pods[standby]["node"] == node else standby
        plane.kubectl("delete", "pod", victim, "-n", q.OPERATOR_NAMESPACE)
        eventually(lambda: leader_pod(plane) != victim, f"the Lease not held by {victim}", timeout=60)  # noqa: B023
    raise AssertionError(f"the operator's leader did not move to {node}")


def not_ready_since(plane: ControlPlane, name: str) -> float | None:
    """When the node's Ready condition last turned from True (Unix time, whole seconds), if not True now."""
    node = json.loads(plane.kubectl("get", "node", name, "-o", "json").stdout)
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    if ready["status"] == "True":
        return None
    return datetime.fromisoformat(ready["lastTransitionTime"]).timestamp()


def queue_writers(plane: ControlPlane) -> dict[str, datetime]:
    """``writers`` over what the operator writes for the example queue: its worker Deployment, the
    StreamQueue (status) and the worker Pods (deletion-cost annotations)."""
    show = ("-n", q.NAMESPACE, "-o", "json", "--show-managed-fields")  # kubectl hides them by default
    objects: list[dict[str, Any]] = []
    for kind, name in (("deployment", q.DEPLOYMENT), ("streamqueue", q.QUEUE)):
        objects.append(json.loads(plane.kubectl("get", kind, name, *show).stdout))
    objects += json.loads(plane.kubectl("get", "pods", "-l", q.POD_SELECTOR, *show).stdout)["items"]
    return writers(objects)
