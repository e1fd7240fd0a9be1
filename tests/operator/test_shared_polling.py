"""Shared polling on a real redis-server: many queues, one connection and one round trip per tick;
a queue at rest costs one XINFO GROUPS per poll and wakes at its first message in the same poll."""

from __future__ import annotations

import asyncio
from typing import Any

import redis
from streamqueue.connection import RedisConnection
from streamqueue_harness.redis_server import RedisServer
from streamqueue_operator.decide import Decision
from streamqueue_operator.observe import at_rest, observe_with
from streamqueue_operator.redis_hub import RedisHub, until_next_tick
from streamqueue_operator.scaler import QueueScaler, Replicas
from streamqueue_operator.settings import OperatorSettings

GROUP = "g"
QUEUES = 50


def _stats(r: redis.Redis) -> dict[str, Any]:
    return r.info("stats")


def _xinfo_calls(r: redis.Redis, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_xinfo|{command}", {}).get("calls", 0))


def test_ticks_line_up_loops_with_the_same_interval() -> None:
    assert until_next_tick(1.0, 10.25) == 0.75
    assert until_next_tick(5.0, 12.0) == 3.0
    assert {round(t + until_next_tick(1.0, t), 6) for t in (3.01, 3.5, 3.99)} == {4.0}


async def test_many_queues_share_one_connection_and_one_round_trip(redis_server: RedisServer) -> None:
    r = redis_server.client()
    for i in range(QUEUES):
        r.xgroup_create(f"s{i}", GROUP, id="0", mkstream=True)
        for _ in range(i % 4):
            r.xadd(f"s{i}", {"m": "x"})
    r.set("s7", "not a stream")  # one queue's error reply stays that queue's
    hub = RedisHub()
    connection = RedisConnection(url=redis_server.url, socket_timeout=2)
    shares = [hub.acquire(connection) for _ in range(QUEUES)]
    assert len({id(s.client) for s in shares}) == 1
    await observe_with(shares[0].pipeline.execute, ["s0"], GROUP, at=0.0)  # connected (HELLO etc.)
    before = _stats(r)
    observations = await asyncio.gather(
        *(observe_with(s.pipeline.execute, [f"s{i}"], GROUP, at=1.0) for i, s in enumerate(shares))
    )
    after = _stats(r)
    # The queues' 150 commands in one pipeline: one read on the server, not 50 (the INFO is the other).
    assert after["total_reads_processed"] - before["total_reads_processed"] <= 3
    assert after["total_connections_received"] == before["total_connections_received"]
    assert [o.backlog for i, o in enumerate(observations) if i != 7] == [
        i % 4 for i in range(QUEUES) if i != 7
    ]
    assert observations[7].error is not None or observations[7].group_missing
    for share in shares:
        await hub.release(share)
    assert shares[0].client.connection_pool._in_use_connections == set()  # type: ignore[union-attr]


async def test_at_rest_until_the_first_message(redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.xgroup_create("a", GROUP, id="0", mkstream=True)
    r.xgroup_create("b", GROUP, id="0", mkstream=True)
    hub = RedisHub()
    share = hub.acquire(RedisConnection(url=redis_server.url, socket_timeout=2))
    try:
        run = share.pipeline.execute
        assert await at_rest(run, ["a", "b"], GROUP)
        r.xadd("b", {"m": "x"})
        assert not await at_rest(run, ["a", "b"], GROUP)  # any partition's first message
        r.xreadgroup(GROUP, "c", {"b": ">"})
        assert not await at_rest(run, ["a", "b"], GROUP)  # delivered, not acknowledged
        assert not await at_rest(run, ["a", "missing"], GROUP)
        assert not await at_rest(run, ["a"], "other-group")
    finally:
        await hub.release(share)


class StatusSink:
    """The scaler's view of the cluster in these tests: status and scale patches land at once."""

    def __init__(self) -> None:
        self.patches = 0

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.patches += 1

    async def scale(self, namespace: str, deployment: str, replicas: int) -> None:
        self.patches += 1


async def test_a_queue_at_rest_is_only_checked_and_wakes_at_its_first_message(
    redis_server: RedisServer,
) -> None:
    r = redis_server.client()
    r.xgroup_create("q", GROUP, id="0", mkstream=True)
    sink = StatusSink()
    scaler = QueueScaler(sink, OperatorSettings(status_min_interval=10), "ns", "q")  # type: ignore[arg-type]
    body = {
        "metadata": {"generation": 1, "annotations": {}},
        "spec": {
            "redis": {"url": redis_server.url},
            **{"stream": "q", "group": GROUP, "scaling": {"minReplicas": 0}},
        },
    }
    scaled: list[tuple[int, int]] = []

    def on_scale(before: int, after: int, decision: Decision) -> None:
        scaled.append((before, after))

    async def poll(replicas: Replicas) -> None:
        await scaler.poll(body, replicas, on_scale)
        if scaler._status_write is not None:
            await scaler._status_write  # the write is off the poll path; here it lands before the next

    try:
        at_zero = Replicas(0, 0)
        for _ in range(2):  # the first poll writes status, the second finds it written and rests
            await poll(at_zero)
        full_polls, patches = _xinfo_calls(r, "stream"), sink.patches
        for _ in range(5):
            await poll(at_zero)
        assert (_xinfo_calls(r, "stream"), sink.patches) == (full_polls, patches)  # checks only
        body["metadata"]["annotations"] = {"note": "changed"}  # the objects changed: one full poll
        await poll(at_zero)
        assert _xinfo_calls(r, "stream") == full_polls + 1
        await poll(at_zero)
        r.xadd("q", {"m": "x"})
        await poll(at_zero)  # the check sees lag 1 and the same poll scales up
        assert scaled == [(0, 1)]
    finally:
        await scaler.close()
