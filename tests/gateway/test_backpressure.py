"""The gateway's backlog check on a real redis-server and Redis Cluster: lag + pending as the operator
counts it, one read per refresh interval per process, and 503 (fail closed) while Redis is away."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from streamqueue import wire
from streamqueue.connection import RedisConnection, connect_any
from streamqueue.observation import Observation
from streamqueue_gateway.backpressure import MAX_RETRY_S, Backlog, Overloaded, drain_seconds
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.redis_cluster import RedisClusterServer
from streamqueue_harness.redis_server import RedisServer

GROUP = "ai_service_group"


async def overloaded(backlog: Backlog) -> Overloaded | None:
    try:
        await backlog.check()
    except Overloaded as exc:
        return exc
    return None


def fill(r: object, stream: str, n: int, group: bool = True) -> None:
    """``n`` entries in ``stream``, with the consumer group created before them (so they are its lag)."""
    if group:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)  # type: ignore[attr-defined]
    for i in range(n):
        r.xadd(stream, {wire.USER_ID: "u", "message": str(i)})  # type: ignore[attr-defined]


async def test_the_backlog_above_the_limit_is_refused_with_the_operators_count(
    redis_server: RedisServer,
) -> None:
    """Lag and pending both count; a stream not created yet is no backlog."""
    redis = connect_any(RedisConnection(url=redis_server.url))
    backlog = Backlog(redis, "q", 1, GROUP, max_backlog=5, refresh_s=0.05)
    assert await overloaded(backlog) is None  # no stream yet
    r = redis_server.client(decode_responses=True)
    fill(r, "q", 5)
    assert await overloaded(backlog) is None  # 5 is not above 5
    r.xreadgroup(GROUP, "c1", {"q": ">"}, count=3)  # 2 lag + 3 pending: still 5
    r.xadd("q", {wire.USER_ID: "u", "message": "sixth"})

    async def refused() -> Overloaded | None:
        return await overloaded(backlog)

    refusal = await eventually_async(refused, "the sixth entry to put the queue over its limit", timeout=5)
    assert refusal.reason == "backlog" and 0.05 <= refusal.retry_after_s <= MAX_RETRY_S
    r.xack("q", GROUP, *[entry_id for entry_id, _ in r.xrange("q", count=3)])

    async def admitted() -> bool:
        return await overloaded(backlog) is None

    await eventually_async(admitted, "the acknowledged entries to bring it back under", timeout=5)
    await redis.aclose()


async def test_a_missing_group_counts_the_whole_stream(redis_server: RedisServer) -> None:
    redis = connect_any(RedisConnection(url=redis_server.url))
    fill(redis_server.client(), "q", 3, group=False)
    assert await overloaded(Backlog(redis, "q", 1, GROUP, max_backlog=2, refresh_s=60)) is not None
    assert await overloaded(Backlog(redis, "q", 1, GROUP, max_backlog=3, refresh_s=60)) is None
    await redis.aclose()


async def test_one_read_serves_every_request_of_a_refresh_interval(redis_server: RedisServer) -> None:
    redis = connect_any(RedisConnection(url=redis_server.url))
    backlog = Backlog(redis, "q", 1, GROUP, max_backlog=10, refresh_s=60)
    await asyncio.gather(*(backlog.check() for _ in range(200)))
    await backlog.check()
    assert backlog.reads == 1
    off = Backlog(redis, "q", 1, GROUP, max_backlog=0, refresh_s=60)
    await off.check()
    assert off.reads == 0  # maxBacklog 0: the check is off and costs nothing
    await redis.aclose()


async def test_redis_down_is_503_once_the_last_read_is_stale_and_recovers(redis_server: RedisServer) -> None:
    """While Redis is away, once the last good read is older than the staleness bound, every request
    is refused without waiting on it (concurrent requests share one attempt); once it is back,
    requests are admitted again."""
    redis = connect_any(RedisConnection(url=redis_server.url))
    backlog = Backlog(redis, "q", 1, GROUP, max_backlog=10, refresh_s=0.2, timeout_s=1.0, stale_s=0.5)
    assert await overloaded(backlog) is None
    redis_server.stop()

    async def down() -> Overloaded | None:
        return await overloaded(backlog)

    refusal = await eventually_async(down, "the outage to be seen", timeout=10)
    assert refusal.reason == "redis" and refusal.retry_after_s == 0.2
    reads = backlog.reads
    results = await asyncio.gather(*(overloaded(backlog) for _ in range(100)))
    assert all(r is not None and r.reason == "redis" for r in results)
    assert backlog.reads <= reads + 2  # one, or two if the backoff (25-50 ms) passed meanwhile

    redis_server.start()

    async def admitted() -> bool:
        return await overloaded(backlog) is None

    await eventually_async(admitted, "requests to be admitted again", timeout=15)
    await redis.aclose()


async def test_a_failed_read_refuses_nobody_while_the_last_good_one_is_recent(
    redis_server: RedisServer,
) -> None:
    """One slow or failed backlog read (here: Redis paused longer than the read's timeout) is not a
    refusal: the last good read decides meanwhile, and the next read is tried soon after, not a whole
    refresh interval (which once cost every request a second of 503s)."""
    redis = connect_any(RedisConnection(url=redis_server.url))
    backlog = Backlog(redis, "q", 1, GROUP, max_backlog=10, refresh_s=0.1, timeout_s=0.3, stale_s=60)
    assert await overloaded(backlog) is None
    redis_server.client().client_pause(1500)  # every command waits 1.5 s: reads time out meanwhile
    refusals: list[Overloaded | None] = []

    async def read_failed() -> bool:
        refusals.append(await overloaded(backlog))
        return backlog.failed_reads > 0

    await eventually_async(read_failed, "a backlog read to time out", timeout=10)

    async def read_again() -> bool:
        refusals.append(await overloaded(backlog))
        return backlog.failed_reads == 0

    await eventually_async(read_again, "a read to succeed once Redis answers", timeout=10)
    assert refusals and all(refusal is None for refusal in refusals)
    await redis.aclose()


async def test_a_partitioned_queue_on_a_cluster_sums_its_partitions(
    redis_cluster: RedisClusterServer,
) -> None:
    """Three partition streams on different slots, read in one pipeline (one batch per node)."""
    redis = await connect_any(RedisConnection(url=redis_cluster.url, cluster=True)).initialize()
    stream = f"q{uuid.uuid4().hex[:6]}"
    r = redis_cluster.client(decode_responses=True)
    for name in wire.partition_streams(stream, 3):
        fill(r, name, 2)
    assert await overloaded(Backlog(redis, stream, 3, GROUP, max_backlog=6, refresh_s=60)) is None
    refusal = await overloaded(Backlog(redis, stream, 3, GROUP, max_backlog=5, refresh_s=60))
    assert refusal is not None and refusal.reason == "backlog"
    await redis.aclose()


@pytest.mark.parametrize(
    ("previous", "current", "expected"),
    [
        (None, Observation(at=10, entries_read=100), None),  # one read: no rate yet
        (Observation(at=0, entries_read=None), Observation(at=10, entries_read=100), None),
        (Observation(at=0, entries_read=100), Observation(at=10, entries_read=100), None),  # stalled
        (Observation(at=0, entries_read=100), Observation(at=2, entries_read=300), 0.5),  # 100/s, 50 over
    ],
)
def test_drain_seconds_from_the_read_rate(
    previous: Observation | None, current: Observation, expected: float | None
) -> None:
    assert drain_seconds(50, previous, current) == expected
