"""StreamQueues in a test namespace, pointed at the test's redis-server: the kube tests' vocabulary."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis
import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from streamqueue_harness.operatorha import metric as metric  # the kube tests read it from here
from streamqueue_operator.models import GROUP, PLURAL, VERSION

STREAM, CGROUP = "user_messages_queue", "ai_service_group"


@dataclass
class Queues:
    """StreamQueues in the test's namespace, pointed at the test's redis-server, and what they drive."""

    plane: Any
    namespace: str
    api: k8s.ApiClient
    redis_url: str

    def apply(
        self,
        name: str,
        housekeeping: dict[str, Any] | None = None,
        worker: dict[str, Any] | None = None,
        version: str = VERSION,
        **scaling: Any,
    ) -> None:
        manifest = {
            "apiVersion": f"{GROUP}/{version}",
            "kind": "StreamQueue",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "redis": {"url": self.redis_url},
                "scaling": {"pollIntervalSeconds": 0.5, **scaling},
                "housekeeping": {"intervalSeconds": 5, **(housekeeping or {})},
                **({"worker": worker} if worker else {}),
            },
        }
        self.plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def stream(self, backlog: int = 0, **client_options: Any) -> redis.Redis:
        """The queues' stream and consumer group (made at 0) with ``backlog`` entries waiting; its client.

        Every kube test starts from this state: the scaler reads the group's lag as the backlog.
        """
        r = redis.Redis.from_url(self.redis_url, **client_options)
        r.xgroup_create(STREAM, CGROUP, id="0", mkstream=True)
        push(r, backlog)
        return r

    def get(self, name: str) -> dict[str, Any]:
        custom = k8s.CustomObjectsApi(self.api)
        return custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        conditions = self.get(name).get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == kind), {})

    def replicas(self, name: str) -> int | None:
        try:
            deployment = k8s.AppsV1Api(self.api).read_namespaced_deployment(f"{name}-worker", self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return deployment.spec.replicas

    def scale_events(self, name: str) -> list[tuple[str, str]]:
        events = k8s.CoreV1Api(self.api).list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.kind=StreamQueue,involvedObject.name={name}"
        )
        return [(e.reason, e.message) for e in events.items if e.reason in ("ScaledUp", "ScaledDown")]


def push(r: redis.Redis, n: int) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(STREAM, {"user_id": f"user{i % 5}", "message": f"m{i}", "timestamp": "0"})
    pipe.execute()


def steady(check: Any, seconds: float, interval: float = 0.25) -> list[Any]:
    """Sample ``check`` for ``seconds``; the caller asserts nothing changed."""
    samples, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(check())
        time.sleep(interval)
    return samples
