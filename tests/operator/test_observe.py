"""Observation against a real redis-server: counts, nil lag after XDEL/XTRIM/SETID, missing group, outage."""

from __future__ import annotations

import redis
import redis.asyncio
from streamqueue.connection import RedisConnection, connect
from streamqueue_harness.redis_server import RedisServer
from streamqueue_operator.observe import Observation, combine, observe

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
