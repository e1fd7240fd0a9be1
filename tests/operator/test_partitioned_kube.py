"""A partitioned queue on a real Redis Cluster, run by the operator against the real control plane.

The operator must see the queue's backlog summed over its partitions (each partition its own stream,
group and hash slot), render the queue's shape into the pods, and the API server must refuse an
ordered queue with more replicas than partitions.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import yaml
from streamqueue import wire
from streamqueue_harness.controlplane import KubectlError
from streamqueue_harness.eventually import eventually
from streamqueue_harness.podrunner import WorkerPodRunner
from streamqueue_operator.models import GROUP, VERSION

from tests.operator.queues import CGROUP, Queues

pytestmark = pytest.mark.slow

PARTITIONS = 4
PER_PARTITION = 30


def _manifest(namespace: str, url: str, **spec: Any) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "StreamQueue",
            "metadata": {"name": "parts", "namespace": namespace},
            "spec": {"redis": {"url": url, "cluster": True}, **spec},
        }
    )


def test_the_operator_scales_a_cluster_queue_on_its_summed_backlog(
    control_plane: Any, kube_namespace: str, api: Any, redis_cluster: Any, start_operator: Any
) -> None:
    client = redis_cluster.client(decode_responses=True)
    streams = wire.partition_streams("parts", PARTITIONS)
    users = [f"pu-{i}" for i in range(40)]
    for stream in streams:
        client.xgroup_create(stream, CGROUP, id="0", mkstream=True)
    pipe = client.pipeline(transaction=False)
    sent = 0
    for stream in streams:  # the same backlog in every partition, users routed as producers do
        mine = [
            u
            for u in users
            if wire.partition_stream("parts", wire.partition_of(u, PARTITIONS), PARTITIONS) == stream
        ]
        for n in range(PER_PARTITION):
            pipe.xadd(
                stream, {"user_id": mine[n % len(mine)], "message": f"m{n}", "request_id": f"{stream}-{n}"}
            )
            sent += 1
    pipe.execute()
    start_operator()
    sq = Queues(control_plane, kube_namespace, api, redis_cluster.url)
    scaling = {"pollIntervalSeconds": 0.5, "minReplicas": 0, "maxReplicas": 20, "targetBacklogPerReplica": 10,
               "scaleDownStabilizationSeconds": 3, "idleCooldownSeconds": 3}  # fmt: skip
    control_plane.kubectl(
        "apply",
        "-f",
        "-",
        input=_manifest(
            kube_namespace, redis_cluster.url, stream="parts", partitions=PARTITIONS, scaling=scaling
        ),
    )

    want = math.ceil(sent / 10)  # one partition alone would ask for 3
    eventually(lambda: sq.replicas("parts") == want, f"{want} replicas for {sent} entries", timeout=30)
    status = eventually(lambda: sq.get("parts").get("status", {}), "a status", timeout=10)
    assert status["backlog"] == sent
    per_partition = {stream: PER_PARTITION for stream in streams}
    eventually(
        lambda: sq.get("parts")["status"].get("partitions") == per_partition,
        "per-partition backlog",
        timeout=10,
    )

    runner = WorkerPodRunner(control_plane.kubeconfig, kube_namespace, "streamqueue.io/queue=parts")
    runner.start()
    try:
        answered = lambda: sum(client.xlen(wire.reply_stream("ai_to_user:", u)) for u in users)  # noqa: E731
        eventually(
            lambda: answered() == sent,
            "the pods (partitions and cluster from the spec) to answer all",
            timeout=120,
        )
        eventually(lambda: sq.replicas("parts") == 0, "back to zero", timeout=60)
    finally:
        runner.stop()


def test_an_ordered_queue_with_more_replicas_than_partitions_is_refused(
    control_plane: Any, kube_namespace: str, streamqueue_crd: Any
) -> None:
    manifest = _manifest(
        kube_namespace, "redis://redis:6379/0", partitions=2, ordering="perUser", scaling={"maxReplicas": 5}
    )
    with pytest.raises(KubectlError, match=r"scaling\.maxReplicas must be at most partitions"):
        control_plane.kubectl("apply", "-f", "-", input=manifest)
    control_plane.kubectl(
        "apply", "-f", "-", input=manifest.replace("maxReplicas: 5", "maxReplicas: 2")
    )  # at the cap: accepted
