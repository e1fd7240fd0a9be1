"""The operator dials the Redis its workers reach: a single-label host qualified with the queue's namespace.

Pure rule first (table and property), then the client the scaler builds for a queue, inspected without
dialling (no DNS here; the real-DNS test belongs with the production topology).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis, RedisCluster
from streamqueue_operator.deployment import worker_env
from streamqueue_operator.models import parse_spec
from streamqueue_operator.redis_access import Credentials, connect, operator_url, qualified_host
from streamqueue_operator.scaler import QueueScaler
from streamqueue_operator.settings import OperatorSettings


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://redis:6379/0", "redis://redis.shop.svc:6379/0"),  # the StreamQueue's default URL
        ("rediss://cache/3", "rediss://cache.shop.svc/3"),
        ("redis://sq@redis:6379/0", "redis://sq@redis.shop.svc:6379/0"),
        ("redis://:p%40ss@redis:6379/0?protocol=3", "redis://:p%40ss@redis.shop.svc:6379/0?protocol=3"),
        ("redis://redis.other:6379/0", "redis://redis.other:6379/0"),  # another namespace, said so
        ("redis://redis.other.svc.cluster.local:6379/0", "redis://redis.other.svc.cluster.local:6379/0"),
        ("redis://redis.example.com:6380/0", "redis://redis.example.com:6380/0"),
        ("redis://10.0.0.7:6379/0", "redis://10.0.0.7:6379/0"),
        ("redis://[fd00::7]:6379/0", "redis://[fd00::7]:6379/0"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://LOCALHOST:6379/0", "redis://LOCALHOST:6379/0"),
    ],
)
def test_only_a_single_label_name_is_qualified(url: str, expected: str) -> None:
    assert operator_url(url, "shop") == expected


labels = st.from_regex(r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


@given(labels, labels)
def test_a_qualified_host_is_left_alone_and_names_the_namespace(host: str, namespace: str) -> None:
    qualified = qualified_host(host, namespace)
    assert qualified_host(qualified, namespace) == qualified  # qualifying twice changes nothing
    assert qualified in (host, f"{host}.{namespace}.svc")
    assert (qualified == host) == (host == "localhost")


def _host(client: Redis | RedisCluster) -> str:
    if isinstance(client, RedisCluster):
        return next(iter(client.nodes_manager.startup_nodes.values())).host
    return str(client.connection_pool.connection_kwargs["host"])


@pytest.mark.parametrize("cluster", [False, True])
async def test_the_operator_dials_the_qualified_host_the_workers_the_url_as_written(cluster: bool) -> None:
    spec = parse_spec({"redis": {"cluster": cluster}})  # url: redis://redis:6379/0
    client = connect(spec.redis, Credentials(None, None), "shop")
    try:
        assert _host(client) == "redis.shop.svc"
    finally:
        await client.aclose()
    env = {e["name"]: e for e in worker_env(spec)}
    assert env["STREAMQUEUE_REDIS_URL"]["value"] == "redis://redis:6379/0"  # resolved in their namespace


class NoSecrets:
    async def secret_value(self, namespace: str, ref: object) -> str:
        raise AssertionError("the spec names no Secret")


async def test_a_queue_scaler_connects_through_its_own_namespace() -> None:
    scaler = QueueScaler(NoSecrets(), OperatorSettings(status_min_interval=10), "team-a", "q")  # type: ignore[arg-type]
    try:
        shared = await scaler._redis(parse_spec({}).redis)
        assert shared is not None and _host(shared.client) == "redis.team-a.svc"
    finally:
        await scaler.close()
