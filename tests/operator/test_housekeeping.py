"""Housekeeping against a real redis-server: dead consumers and safe trimming never lose an entry."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import redis
import redis.asyncio
from streamqueue.connection import RedisConnection, connect
from streamqueue_harness.eventually import eventually
from streamqueue_harness.redis_server import RedisServer
from streamqueue_operator.housekeeping import remove_dead_consumers, trim_processed

STREAM, GROUP = "q", "g"


def _client(server: RedisServer) -> redis.asyncio.Redis:
    """The client the operator uses: decoded replies."""
    return connect(RedisConnection(url=server.url))


def _setup(server: RedisServer, n: int = 10) -> tuple[redis.Redis, redis.asyncio.Redis, list[bytes]]:
    r = server.client()
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = [r.xadd(STREAM, {"user_id": "u", "message": str(i)}) for i in range(n)]
    return r, _client(server), ids


async def test_dead_consumer_with_pending_is_kept_until_its_entries_are_claimed(
    redis_server: RedisServer,
) -> None:
    r, client, _ = _setup(redis_server)
    r.xreadgroup(GROUP, "pod-dead", {STREAM: ">"}, count=3)
    r.xreadgroup(GROUP, "pod-idle-dead", {STREAM: ">"}, count=1)
    r.xack(
        STREAM,
        GROUP,
        *[e["message_id"] for e in r.xpending_range(STREAM, GROUP, "-", "+", 10, "pod-idle-dead")],
    )
    r.xreadgroup(GROUP, "pod-live", {STREAM: ">"}, count=2)

    result = await remove_dead_consumers(client, STREAM, GROUP, live_pods={"pod-live"})
    assert result.deleted == ("pod-idle-dead",) and result.kept_with_pending == ("pod-dead",)
    assert r.xpending(STREAM, GROUP)["pending"] == 5  # nothing lost

    r.xautoclaim(STREAM, GROUP, "pod-live", min_idle_time=0, start_id="0-0", count=10)
    result = await remove_dead_consumers(client, STREAM, GROUP, live_pods={"pod-live"})
    assert result.deleted == ("pod-dead",)
    assert r.xpending(STREAM, GROUP)["pending"] == 5
    assert [_name(c) for c in r.xinfo_consumers(STREAM, GROUP)] == ["pod-live"]


def _name(info: dict) -> str:
    return info["name"].decode()


async def test_trim_keeps_pending_and_undelivered_entries_of_every_group(redis_server: RedisServer) -> None:
    r, client, ids = _setup(redis_server)
    r.xgroup_create(STREAM, "slow", id="0")
    # g: delivered 6, acked the first 4 -> needs ids[4:]; slow: delivered 2, acked all -> needs ids[2:].
    delivered = r.xreadgroup(GROUP, "c", {STREAM: ">"}, count=6)[0][1]
    r.xack(STREAM, GROUP, *[e[0] for e in delivered[:4]])
    slow = r.xreadgroup("slow", "c", {STREAM: ">"}, count=2)[0][1]
    r.xack(STREAM, "slow", *[e[0] for e in slow])

    assert await trim_processed(client, STREAM) == 2
    assert [e[0] for e in r.xrange(STREAM)] == ids[2:]

    r.xack(STREAM, GROUP, *[e[0] for e in delivered[4:]])
    r.xreadgroup("slow", "c", {STREAM: ">"}, count=10)  # slow now has ids[2:] pending
    assert await trim_processed(client, STREAM) == 0


async def test_trim_after_everything_is_acknowledged_empties_the_stream(redis_server: RedisServer) -> None:
    r, client, _ = _setup(redis_server, n=5)
    entries = r.xreadgroup(GROUP, "c", {STREAM: ">"}, count=10)[0][1]
    r.xack(STREAM, GROUP, *[e[0] for e in entries])
    assert await trim_processed(client, STREAM) == 5
    r.xadd(STREAM, {"user_id": "u", "message": "new"})
    assert await trim_processed(client, STREAM) == 0 and r.xlen(STREAM) == 1


async def test_trim_without_groups_does_nothing(redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.xadd(STREAM, {"m": "1"})
    assert await trim_processed(_client(redis_server), STREAM) == 0
    assert r.xlen(STREAM) == 1


async def test_consumers_of_workers_outside_the_deployment_are_never_deleted(
    redis_server: RedisServer,
) -> None:
    """A mixed fleet: the article's loop (consumers ``worker_1``, ``worker_2``: no Pod can be named so)
    shares the group with pods. Busy or idle, the operator leaves them alone."""
    r, client, _ = _setup(redis_server, n=3)
    r.xreadgroup(GROUP, "worker_1", {STREAM: ">"}, count=1)  # in its handler: one entry pending
    [[_, [(between, _)]]] = r.xreadgroup(GROUP, "worker_2", {STREAM: ">"}, count=1)
    r.xack(STREAM, GROUP, between)  # answered; waits in XREADGROUP for the next one
    [[_, [(done, _)]]] = r.xreadgroup(GROUP, "pod-gone", {STREAM: ">"}, count=1)
    r.xack(STREAM, GROUP, done)

    result = await remove_dead_consumers(client, STREAM, GROUP, live_pods=set())
    assert result.deleted == ("pod-gone",) and result.kept_with_pending == ()
    assert result.not_pod_names == ("worker_1", "worker_2")
    assert sorted(_name(c) for c in r.xinfo_consumers(STREAM, GROUP)) == ["worker_1", "worker_2"]
    assert r.xpending(STREAM, GROUP)["consumers"] == [{"name": b"worker_1", "pending": 1}]


async def test_an_idle_consumer_deleted_while_it_blocks_still_gets_its_next_entry(
    redis_server: RedisServer,
) -> None:
    """A foreign worker whose name could be a Pod's (``worker-1``) is deleted between messages. Redis
    recreates it when its blocked XREADGROUP is served, so the entry is delivered and pending as usual."""
    r, client, _ = _setup(redis_server, n=1)
    [[_, [(first, _)]]] = r.xreadgroup(GROUP, "worker-1", {STREAM: ">"}, count=1)
    r.xack(STREAM, GROUP, first)
    worker = redis_server.client(single_connection_client=True, socket_timeout=15)
    worker_id = worker.client_id()
    with ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(worker.xreadgroup, GROUP, "worker-1", {STREAM: ">"}, count=1, block=10_000)
        eventually(
            lambda: "b" in r.client_list(client_id=[worker_id])[0]["flags"], "the read to block", timeout=10
        )

        assert (await remove_dead_consumers(client, STREAM, GROUP, live_pods=set())).deleted == ("worker-1",)
        entry_id = r.xadd(STREAM, {"user_id": "u", "message": "next"})
        [[_, [(got, _)]]] = blocked.result(timeout=10)
    assert got == entry_id
    assert r.xpending(STREAM, GROUP)["consumers"] == [{"name": b"worker-1", "pending": 1}]
