"""The Kubernetes side of ``kubectl sq``: the user's ``kubectl``, with their kubeconfig and context."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, replace
from typing import Any

GROUP = "streamqueue.io"
RESOURCE = f"streamqueues.{GROUP}"
QUEUE_LABEL = f"{GROUP}/queue"  # on the worker Deployment and its pods
WORKER_CONTAINER = "worker"
# The pause annotations (the operator's decide.PAUSED / PAUSED_REPLICAS; a test keeps them equal).
PAUSED = f"{GROUP}/paused"
PAUSED_REPLICAS = f"{GROUP}/paused-replicas"
# The Secret with kubectl sq's own Redis user (``username``, ``password``) when ``--redis-secret`` names none.
TOOL_REDIS_SECRET = f"{GROUP}/tool-redis-secret"


class KubectlError(RuntimeError):
    """kubectl failed; the message is kubectl's own."""


@dataclass(frozen=True)
class Kubectl:
    """How to call kubectl: the binary ($KUBECTL, else ``kubectl`` on PATH) and the user's flags."""

    namespace: str | None = None
    context: str | None = None
    kubeconfig: str | None = None
    binary: str = os.environ.get("KUBECTL", "kubectl")

    def command(self, *args: str, namespaced: bool = True) -> list[str]:
        flags = [
            f"--{name}={value}"
            for name, value in (("kubeconfig", self.kubeconfig), ("context", self.context))
            if value
        ]
        if namespaced and self.namespace:
            flags.append(f"--namespace={self.namespace}")
        return [self.binary, *flags, *args]

    def run(self, *args: str, namespaced: bool = True, stdin: str | None = None, timeout: float = 120) -> str:
        done = subprocess.run(
            self.command(*args, namespaced=namespaced), input=stdin, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise KubectlError(done.stderr.strip() or f"kubectl {' '.join(args)} exited {done.returncode}")
        return done.stdout

    def get(self, *args: str, namespaced: bool = True) -> Any:
        return json.loads(self.run("get", *args, "-o", "json", namespaced=namespaced))


@dataclass(frozen=True)
class Queue:
    """A StreamQueue and its worker Deployment (None before the operator created it)."""

    name: str
    namespace: str
    obj: dict[str, Any]
    deployment: dict[str, Any] | None

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.obj["metadata"].get("annotations") or {})

    def worker_container(self) -> dict[str, Any]:
        if self.deployment is None:
            raise KubectlError(
                f"StreamQueue {self.name} has no worker Deployment yet (is the operator running?)"
            )
        containers = self.deployment["spec"]["template"]["spec"]["containers"]
        return next((c for c in containers if c["name"] == WORKER_CONTAINER), containers[0])


def load_queue(kubectl: Kubectl, name: str) -> Queue:
    obj = kubectl.get(RESOURCE, name)
    namespace = obj["metadata"]["namespace"]
    deployments = kubectl.get("deployments", "-l", f"{QUEUE_LABEL}={name}")["items"]
    return Queue(name, namespace, obj, deployments[0] if deployments else None)


def annotate(kubectl: Kubectl, name: str, *changes: str) -> None:
    kubectl.run("annotate", RESOURCE, name, "--overwrite", *changes)


def events(kubectl: Kubectl, name: str, limit: int = 10) -> list[dict[str, Any]]:
    """The StreamQueue's most recent Events (scale decisions, holds, pauses), newest last."""
    selector = f"involvedObject.kind=StreamQueue,involvedObject.name={name}"
    items = kubectl.get("events", "--field-selector", selector)["items"]
    items.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    return [
        {
            "time": e.get("lastTimestamp") or e.get("eventTime"),
            "type": e.get("type"),
            "reason": e.get("reason"),
            "message": e.get("message"),
            "count": e.get("count", 1),
        }
        for e in items[-limit:]
    ]


def operator_leader(kubectl: Kubectl, lease: str | None) -> dict[str, Any]:
    """The operator's Lease (docs/ha.md): ``NAMESPACE/NAME``, else every Lease named streamqueue*."""
    try:
        if lease:
            namespace, _, name = lease.rpartition("/")
            found = [replace(kubectl, namespace=namespace or kubectl.namespace).get("lease", name)]
        else:
            found = [
                item for item in kubectl.get("leases", "--all-namespaces", namespaced=False)["items"]
                if "streamqueue" in item["metadata"]["name"]
            ]  # fmt: skip
    except KubectlError as exc:
        return {"error": str(exc)}
    return {
        "leases": [
            {
                "lease": f"{item['metadata']['namespace']}/{item['metadata']['name']}",
                "holder": item["spec"].get("holderIdentity") or None,
                "renewed": item["spec"].get("renewTime"),
            }
            for item in found
        ]
    }
