"""pod-deletion-cost before a scale-down of a partitioned queue: every partition's consumers, per pod.

The Redis side is real (one redis-server, and the Redis Cluster fixture where the partitions live on
different nodes); the pod API is ``pods.PodAnnotations``, which records the annotations written.
"""

from __future__ import annotations

import redis
from streamqueue import wire
from streamqueue_harness.redis_cluster import RedisClusterServer
from streamqueue_harness.redis_server import RedisServer
from streamqueue_operator.deletion_cost import cost
from streamqueue_operator.models import parse_spec
from streamqueue_operator.scaler import QueueScaler
from streamqueue_operator.settings import OperatorSettings

from tests.operator.pods import PodAnnotations

STREAM, GROUP, PARTITIONS = "rq", "g", 3
PODS = ("busy", "holding", "idle", "gone")


def _partitioned_queue(r: redis.Redis | redis.RedisCluster) -> None:
    """Three partitions: "holding" holds entries on two of them, "busy" holds one, "idle" none."""
    streams = wire.partition_streams(STREAM, PARTITIONS)
    for stream in streams:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
        for i in range(3):
            r.xadd(stream, {"user_id": "u", "message": str(i)})
    r.xgroup_createconsumer(streams[0], GROUP, "idle")  # a consumer with nothing pending
    r.xreadgroup(GROUP, "holding", {streams[1]: ">"}, count=2)
    r.xreadgroup(GROUP, "holding", {streams[2]: ">"}, count=2)
    r.xreadgroup(GROUP, "busy", {streams[0]: ">"}, count=1)


async def _rank(url: str, cluster: bool) -> dict[str, str | None]:
    pods = PodAnnotations(*PODS)
    scaler = QueueScaler(pods, OperatorSettings(status_min_interval=10), "ns", "q")  # type: ignore[arg-type]
    spec = parse_spec(
        {
            "redis": {"url": url, "cluster": cluster},
            "stream": STREAM,
            "group": GROUP,
            "partitions": PARTITIONS,
        }
    )
    await scaler._redis(spec.redis)
    try:
        await scaler._rank_pods_for_removal(spec)
    finally:
        await scaler.close()
    return pods.annotations


def _check(annotations: dict[str, str | None]) -> None:
    costs = {pod: int(value) for pod, value in annotations.items() if value is not None}
    assert costs.keys() == set(PODS), annotations  # every pod ranked, not none (the bare stream's error)
    assert costs["holding"] // 1000 == 4  # its pending entries summed over partitions 1 and 2
    assert costs["busy"] // 1000 == 1
    assert costs["gone"] == cost(None) == 0  # no consumer on any partition
    assert 0 < costs["idle"] < 1000  # a consumer, nothing pending
    assert costs["holding"] > costs["busy"] > costs["idle"] > costs["gone"]


async def test_a_partitioned_queue_ranks_pods_by_every_partitions_consumers(
    redis_server: RedisServer,
) -> None:
    _partitioned_queue(redis_server.client(decode_responses=True))
    _check(await _rank(redis_server.url, cluster=False))


async def test_a_partitioned_queue_on_a_cluster_ranks_pods_by_all_partitions(
    redis_cluster: RedisClusterServer,
) -> None:
    r = redis_cluster.client(decode_responses=True)
    streams = wire.partition_streams(STREAM, PARTITIONS)
    assert len({redis_cluster.primary_for(s) for s in streams}) > 1  # the partitions span nodes
    _partitioned_queue(r)
    _check(await _rank(redis_cluster.url, cluster=True))
