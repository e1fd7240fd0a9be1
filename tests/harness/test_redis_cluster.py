"""The Redis Cluster fixture is a real cluster: keys spread over primaries; a killed primary fails over."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_hash_tags_spread_keys_over_the_primaries(redis_cluster) -> None:
    primaries = {redis_cluster.primary_for(f"queue:{{p{i}}}") for i in range(12)}
    assert len(primaries) == 3


def test_a_killed_primary_is_replaced_by_its_replica_with_the_replicated_data(redis_cluster) -> None:
    client = redis_cluster.client(decode_responses=True)
    key = "failover:{p0}"
    client.xadd(key, {"n": "1"})
    client.execute_command("WAIT", 1, 5000, target_nodes=client.get_node_from_key(key))
    before = redis_cluster.primary_for(key)

    killed = redis_cluster.kill_primary(key)

    assert killed == before
    assert redis_cluster.primary_for(key) != before
    fresh = redis_cluster.client(decode_responses=True)
    assert fresh.xlen(key) == 1
    fresh.xadd(key, {"n": "2"})
    assert fresh.xlen(key) == 2
