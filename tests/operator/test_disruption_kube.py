"""Node drains and worker rollouts on the local control plane, with real worker processes.

The API server enforces a PodDisruptionBudget on every eviction (``kubectl drain`` evicts through the
same API); the Deployment controller rolls the pods when ``spec.worker`` changes. Neither may lose a
request: the workers drain on SIGTERM, and the operator only ever writes ``spec.replicas``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import pytest
import redis
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from streamqueue.client import Client
from streamqueue_harness.eventually import eventually, eventually_async
from streamqueue_harness.podrunner import WorkerPodRunner

from tests.operator.queues import Queues

pytestmark = pytest.mark.kube


def _patch_spec(sq: Queues, name: str, spec: dict[str, Any]) -> None:
    patch = json.dumps({"spec": spec})
    sq.plane.kubectl("-n", sq.namespace, "patch", "streamqueue", name, "--type=merge", "-p", patch)


def _budget(sq: Queues, name: str) -> k8s.V1PodDisruptionBudget | None:
    try:
        return k8s.PolicyV1Api(sq.api).read_namespaced_pod_disruption_budget(name, sq.namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _evict(sq: Queues, pod: str) -> bool:
    """Ask the Eviction API to evict ``pod``: True if it did, False if the budget refused (429)."""
    body = k8s.V1Eviction(metadata=k8s.V1ObjectMeta(name=pod, namespace=sq.namespace))
    try:
        k8s.CoreV1Api(sq.api).create_namespaced_pod_eviction(pod, sq.namespace, body)
    except ApiException as exc:
        if exc.status == 429:
            return False
        raise
    return True


def _ready_pods(sq: Queues, queue: str) -> list[str]:
    pods = k8s.CoreV1Api(sq.api).list_namespaced_pod(
        sq.namespace, label_selector=f"streamqueue.io/queue={queue}"
    )
    return sorted(
        p.metadata.name
        for p in pods.items
        if not p.metadata.deletion_timestamp
        and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    )


def _allows(sq: Queues, name: str, expected: int, allowed: int) -> bool:
    budget = _budget(sq, name)
    status = budget.status if budget else None
    return bool(status and (status.expected_pods, status.disruptions_allowed) == (expected, allowed))


def test_the_workers_budget_is_owned_updated_and_enforced_on_evictions(
    sq: Queues, start_operator: Any
) -> None:
    start_operator()
    sq.stream()
    sq.apply("drain", minReplicas=2, maxReplicas=2)
    budget = eventually(lambda: _budget(sq, "drain-worker"), "the PodDisruptionBudget", timeout=30)
    (owner,) = budget.metadata.owner_references
    assert (owner.kind, owner.name, owner.controller) == ("StreamQueue", "drain", True)
    assert budget.spec.max_unavailable == 1 and budget.spec.min_available is None
    assert budget.spec.selector.match_labels["streamqueue.io/queue"] == "drain"
    assert budget.spec.unhealthy_pod_eviction_policy == "AlwaysAllow"

    with WorkerPodRunner(sq.plane.kubeconfig, sq.namespace, "streamqueue.io/queue=drain"):
        eventually(
            lambda: _allows(sq, "drain-worker", 2, 1), "2 Ready workers, 1 disruption allowed", timeout=60
        )
        first, second = _ready_pods(sq, "drain")
        assert _evict(sq, first)
        assert not _evict(sq, second), "a second eviction while the first worker's replacement starts"
        # The evicted worker drains on SIGTERM; once its replacement is Ready the next one may go.
        eventually(lambda: _evict(sq, second), "the second eviction once a replacement is Ready", timeout=60)

        _patch_spec(sq, "drain", {"scaling": {"minReplicas": 1, "maxReplicas": 1}})
        eventually(lambda: _allows(sq, "drain-worker", 1, 1), "a single worker can be drained", timeout=60)
        _patch_spec(sq, "drain", {"disruption": {"maxUnavailable": "50%"}})
        eventually(
            lambda: (b := _budget(sq, "drain-worker")) and b.spec.max_unavailable == "50%",
            "the budget updated from the spec",
            timeout=30,
        )
        eventually(lambda: _allows(sq, "drain-worker", 1, 1), "50% of 1 rounds up to 1", timeout=30)


def _rolled_out(sq: Queues, deployment: str, generation: int) -> bool:
    """``kubectl rollout status``: the new template observed, every pod updated, no old pod left."""
    found = k8s.AppsV1Api(sq.api).read_namespaced_deployment(deployment, sq.namespace)
    status, want = found.status, found.spec.replicas
    return bool(
        (status.observed_generation or 0) >= generation
        and status.updated_replicas == want
        and status.replicas == want
        and status.available_replicas == want
    )


def _generation_with(sq: Queues, deployment: str, variable: str) -> int | None:
    """The Deployment's generation once its pod template sets ``variable``, else None."""
    found = k8s.AppsV1Api(sq.api).read_namespaced_deployment(deployment, sq.namespace)
    env = found.spec.template.spec.containers[0].env or []
    return found.metadata.generation if any(e.name == variable for e in env) else None


def _duplicates(url: str, users: int) -> int:
    """Replies beyond the first per request_id, over every user's reply stream."""
    r = redis.Redis.from_url(url)
    counts = Counter(
        fields[b"request_id"] for u in range(users) for _, fields in r.xrange(f"ai_to_user:user{u}")
    )
    return sum(n - 1 for n in counts.values())


async def test_a_worker_rollout_mid_burst_answers_every_request(sq: Queues, start_operator: Any) -> None:
    """Users send without pause while a change of ``spec.worker.env`` rolls every worker pod: every
    request is answered, and the operator keeps to its own count (no scale-down mid-rollout)."""
    users, deployment = 12, "roll-worker"
    start_operator()
    sq.stream()
    sq.apply(
        "roll", minReplicas=2, maxReplicas=4, targetBacklogPerReplica=4, scaleDownStabilizationSeconds=600
    )
    apps = k8s.AppsV1Api(sq.api)
    sent: list[str] = []
    answered: set[str] = set()
    stop = asyncio.Event()

    async def user(client: Client, u: int) -> None:
        n = 0
        while not stop.is_set():
            request_id = f"user{u}-{n}"
            sent.append(request_id)
            n += 1
            try:
                await client.request(f"user{u}", f"m{n}", request_id=request_id, timeout=45)
            except TimeoutError:
                continue  # lost: counted below
            answered.add(request_id)

    with WorkerPodRunner(sq.plane.kubeconfig, sq.namespace, "streamqueue.io/queue=roll"):
        await eventually_async(lambda: len(_ready_pods(sq, "roll")) == 2, "2 Ready workers", timeout=60)
        async with Client(sq.redis_url, block_ms=200) as client:
            burst = asyncio.gather(*(user(client, u) for u in range(users)))
            await eventually_async(lambda: len(answered) >= 100, "the burst under way", timeout=30)
            _patch_spec(sq, "roll", {"worker": {"env": [{"name": "ROLLOUT_MARK", "value": "2"}]}})
            started, before = time.monotonic(), len(answered)
            generation = await eventually_async(
                lambda: _generation_with(sq, deployment, "ROLLOUT_MARK"),
                "the operator to update the pod template",
                timeout=15,
            )
            replicas: list[int] = []

            def rolled() -> bool:
                replicas.append(apps.read_namespaced_deployment(deployment, sq.namespace).spec.replicas)
                return _rolled_out(sq, deployment, generation)

            await eventually_async(rolled, "the rollout to complete", timeout=60)
            seconds, during = time.monotonic() - started, len(answered) - before
            await eventually_async(
                lambda: len(answered) >= before + during + 50, "requests after it", timeout=30
            )
            stop.set()
            await asyncio.wait_for(burst, timeout=60)

    lost = len(set(sent) - answered)
    duplicates = _duplicates(sq.redis_url, users)
    print(
        f"rollout {seconds:.1f}s at replicas {sorted(set(replicas))}: {len(sent)} requests, "
        f"{during} answered during the rollout, lost {lost}, duplicate replies {duplicates}"
    )
    assert lost == 0
    assert replicas == sorted(replicas), f"replicas went down mid-rollout: {replicas}"
    assert not [m for reason, m in sq.scale_events("roll") if reason == "ScaledDown"]
