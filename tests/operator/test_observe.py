"""Observation against a real redis-server: counts, nil lag after XDEL/XTRIM/SETID, missing group, outage."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio
from pydantic import SecretStr
from streamqueue import wire
from streamqueue.connection import RedisConnection, connect, connect_any
from streamqueue.observation import combine
from streamqueue_harness.redis_cluster import RedisClusterServer
from streamqueue_harness.redis_server import RedisServer
from streamqueue_operator.observe import Observation, observe

STREAM, GROUP = "q", "g"


def _client(server: RedisServer) -> redis.asyncio.Redis:
    """The client the operator uses: decoded replies, short timeout."""
    return connect(RedisConnection(url=server.url, socket_timeout=2))


def _fill(r: redis.Redis, n: int) -> list[bytes]:
    return [r.xadd(STREAM, {"user_id": "u", "message": str(i)}) for i in range(n)]


async def test_counts_lag_pending_and_backlog(redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    _fill(r, 10)
    r.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=4)
    o = await observe(_client(redis_server), STREAM, GROUP, at=1.0)
    assert o.ok and not o.lag_estimated
    assert (o.lag, o.pending, o.backlog, o.stream_length, o.entries_added, o.consumers) == (
        6,
        4,
        10,
        10,
        10,
        1,
    )


async def test_nil_lag_after_xdel_is_estimated_not_zero(redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = _fill(r, 10)
    r.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=2)
    r.xdel(STREAM, ids[5])  # a tombstone between last-delivered and the end: Redis cannot count lag
    o = await observe(_client(redis_server), STREAM, GROUP, at=1.0)
    assert o.lag_estimated
    assert 7 <= o.lag <= 9  # 7 undelivered remain; the estimate may only overcount
    assert o.backlog >= 9


async def test_nil_lag_after_xtrim_and_setid(redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    _fill(r, 10)
    r.xtrim(STREAM, maxlen=6, approximate=False)  # trimmed entries were never delivered
    o = await observe(_client(redis_server), STREAM, GROUP, at=1.0)
    assert o.lag >= 6 and o.backlog >= 6
    r.xgroup_setid(STREAM, GROUP, id="0")
    o = await observe(_client(redis_server), STREAM, GROUP, at=2.0)
    assert o.lag >= 6


async def test_missing_group_and_missing_stream(redis_server: RedisServer) -> None:
    o = await observe(_client(redis_server), STREAM, GROUP, at=1.0)
    assert o.group_missing and o.error is None and o.stream_length == 0
    r = redis_server.client()
    _fill(r, 3)
    r.xgroup_create(STREAM, "other", id="0")
    o = await observe(_client(redis_server), STREAM, GROUP, at=2.0)
    assert o.group_missing and o.stream_length == 3  # another group's presence does not count
    assert [g["name"] for g in r.xinfo_groups(STREAM)] == [b"other"]


async def test_unreachable_redis_is_an_error_observation(redis_server: RedisServer) -> None:
    client = _client(redis_server)
    redis_server.stop()
    o = await observe(client, STREAM, GROUP, at=1.0)
    assert not o.ok and o.error and "Connection" in o.error
    redis_server.start()
    redis_server.client().xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    assert (await observe(client, STREAM, GROUP, at=2.0)).ok


async def test_the_limit_bound_key_in_the_same_pipeline(redis_server: RedisServer) -> None:
    """Set as a worker sets it (the reason, PX LIMIT_BOUND_TTL_MS); absent or unreadable: not bound."""
    r = redis_server.client()
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    key, client = wire.limit_bound_key(STREAM), _client(redis_server)
    assert (await observe(client, [STREAM], GROUP, at=1.0, limit_key=key)).limit_bound is None
    r.set(key, wire.LIMIT_TOKENS, px=wire.LIMIT_BOUND_TTL_MS)
    o = await observe(client, [STREAM], GROUP, at=2.0, limit_key=key)
    assert o.ok and o.limit_bound == "TokensPerMinute"
    assert (await observe(client, [STREAM], GROUP, at=2.0)).limit_bound is None  # not asked
    r.set(key, "SomethingNew", px=wire.LIMIT_BOUND_TTL_MS)  # a newer worker's reason: still bound
    assert (await observe(client, [STREAM], GROUP, at=3.0, limit_key=key)).limit_bound == "UnknownLimit"
    r.set(key, wire.LIMIT_CONCURRENT, px=wire.LIMIT_BOUND_TTL_MS)
    r.delete(STREAM)
    o = await observe(client, [STREAM], GROUP, at=4.0, limit_key=key)
    assert o.group_missing and o.limit_bound == "ConcurrentCalls"  # read; decide ignores it without data
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    r.delete(key)  # expired
    assert (await observe(client, [STREAM], GROUP, at=5.0, limit_key=key)).limit_bound is None
    r.rpush(key, "not a string")  # WRONGTYPE: unreadable counts as not bound, the observation stands
    o = await observe(client, [STREAM], GROUP, at=6.0, limit_key=key)
    assert o.ok and o.limit_bound is None


async def test_a_user_without_get_still_observes_the_queue(redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    _fill(r, 3)
    key = wire.limit_bound_key(STREAM)
    r.set(key, wire.LIMIT_REQUESTS)
    r.acl_setuser("observer", enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all", "-get"])
    client = connect(
        RedisConnection(
            url=redis_server.url, username="observer", password=SecretStr("secret"), socket_timeout=2
        )
    )
    o = await observe(client, [STREAM], GROUP, at=1.0, limit_key=key)
    assert o.ok and o.lag == 3 and o.limit_bound is None


async def test_an_outage_is_an_error_not_a_missing_limit(redis_server: RedisServer) -> None:
    client = _client(redis_server)
    redis_server.stop()
    o = await observe(client, [STREAM], GROUP, at=1.0, limit_key=wire.limit_bound_key(STREAM))
    assert o.error and o.limit_bound is None
    redis_server.start()


@pytest.mark.slow
async def test_the_limit_bound_key_on_a_cluster_is_read_from_its_own_slot(
    redis_cluster: RedisClusterServer,
) -> None:
    """The key's slot differs from every partition's; the cluster pipeline still reads it in the poll."""
    r = redis_cluster.client(decode_responses=True)
    streams = wire.partition_streams("lb", 3)
    for stream in streams:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
        r.xadd(stream, {"user_id": "u", "message": "m"})
    key = wire.limit_bound_key("lb")
    assert r.cluster_keyslot(key) not in {r.cluster_keyslot(s) for s in streams}
    r.set(key, wire.LIMIT_RETRY_AFTER, px=wire.LIMIT_BOUND_TTL_MS)
    client = connect_any(RedisConnection(url=redis_cluster.url, cluster=True, socket_timeout=2))
    try:
        o = await observe(client, streams, GROUP, at=1.0, limit_key=key)
        assert o.ok and o.lag == 3 and o.limit_bound == "RetryAfter"
        r.delete(key)
        assert (await observe(client, streams, GROUP, at=2.0, limit_key=key)).limit_bound is None
    finally:
        await client.aclose()


def test_a_partitioned_queue_is_the_sum_of_its_partitions() -> None:
    parts = [
        Observation(at=1, stream_length=10, entries_added=12, lag=3, pending=2, entries_read=9, consumers=2),
        Observation(at=1, group_missing=True, stream_length=4, entries_added=4),  # its workers not yet up
        Observation(at=1, stream_length=7, entries_added=7, lag=0, pending=1, entries_read=7, consumers=3),
    ]
    obs = combine(1, ["q:{0}", "q:{1}", "q:{2}"], parts)
    assert (obs.lag, obs.pending, obs.backlog, obs.stream_length) == (3 + 4, 3, 10, 21)
    assert obs.ok and obs.lag_estimated  # the missing group's stream counts as undelivered, flagged
    assert (obs.entries_read, obs.consumers) == (16, 3)
    assert obs.partitions == (("q:{0}", 5), ("q:{1}", 4), ("q:{2}", 1))


def test_a_partitioned_queue_is_missing_only_when_every_group_is_and_fails_with_any_partition() -> None:
    missing = Observation(at=1, group_missing=True, stream_length=2)
    assert combine(1, ["a", "b"], [missing, missing]).group_missing
    failed = Observation(at=1, error="ConnectionError: down")
    assert combine(1, ["a", "b"], [Observation(at=1), failed]).error == "ConnectionError: down"
