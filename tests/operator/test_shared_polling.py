"""Shared polling on a real redis-server: many queues, one connection and one round trip per tick;
the queues at rest cost their own loops no Redis command: one sweep per Redis checks all of them in
one script call and wakes a queue at its first message within the sweep interval."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from streamqueue import wire
from streamqueue.connection import RedisConnection, connect_any
from streamqueue_harness.redis_cluster import RedisClusterServer
from streamqueue_harness.redis_server import RedisServer
from streamqueue_operator import scaler as scaler_module
from streamqueue_operator.decide import Decision
from streamqueue_operator.observe import observe_with
from streamqueue_operator.redis_hub import RedisHub, until_next_tick
from streamqueue_operator.rest_check import not_idle
from streamqueue_operator.scaler import QueueScaler, Replicas
from streamqueue_operator.settings import OperatorSettings

GROUP = "g"
QUEUES = 50
SWEEP_SECONDS = 0.05


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
    hub = RedisHub(SWEEP_SECONDS)
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


@pytest.mark.parametrize("cluster_path", [False, True], ids=["script", "pipeline"])
async def test_not_idle_from_the_first_message(redis_server: RedisServer, cluster_path: bool) -> None:
    """The script (one Redis) and the pipeline (a cluster's path, here on one server) agree."""
    r = redis_server.client()
    for stream in ("a", "b"):
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    r.set("text", "not a stream")
    client = connect_any(RedisConnection(url=redis_server.url, socket_timeout=2))
    checks = [("a", GROUP), ("b", GROUP), ("missing", GROUP), ("a", "other-group"), ("text", GROUP)]
    try:
        assert await not_idle(client, checks, cluster_path) == {2, 3, 4}
        entry = r.xadd("b", {"m": "x"})
        assert await not_idle(client, checks, cluster_path) == {1, 2, 3, 4}  # lag 1
        r.xreadgroup(GROUP, "c", {"b": ">"})
        assert await not_idle(client, checks, cluster_path) == {1, 2, 3, 4}  # delivered, not acknowledged
        r.xack("b", GROUP, entry)
        assert await not_idle(client, checks, cluster_path) == {2, 3, 4}
    finally:
        await client.aclose()


async def test_one_sweep_checks_every_queue_at_rest_in_one_round_trip(redis_server: RedisServer) -> None:
    r = redis_server.client()
    for i in range(QUEUES):
        r.xgroup_create(f"s{i}", GROUP, id="0", mkstream=True)
    hub = RedisHub(3600)  # swept by hand here
    share = hub.acquire(RedisConnection(url=redis_server.url, socket_timeout=2))
    try:
        watches = [share.sweep.watch((f"s{i}",), GROUP) for i in range(QUEUES)]
        await share.sweep.sweep()  # connected (HELLO etc.)
        r.xadd("s7", {"m": "x"})
        before = _stats(r)
        await share.sweep.sweep()
        assert _stats(r)["total_reads_processed"] - before["total_reads_processed"] <= 2  # and the INFO
        assert [i for i, w in enumerate(watches) if w.woken.is_set()] == [7]
        await share.sweep.sweep()  # a woken queue is no longer watched: its full poll takes over
        assert [i for i, w in enumerate(watches) if w.woken.is_set()] == [7]
        redis_server.stop()
        await share.sweep.sweep()  # a connection failure wakes them all: their polls report it
        assert all(w.woken.is_set() for w in watches)
    finally:
        await hub.release(share)


@pytest.mark.slow
async def test_the_sweep_on_a_cluster_wakes_the_partition_with_a_message(
    redis_cluster: RedisClusterServer,
) -> None:
    """A cluster's resting queues span slots, so the sweep takes the pipeline path there."""
    r = redis_cluster.client()
    streams = wire.partition_streams("rest", 3)
    for stream in [*streams, "other"]:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    hub = RedisHub(3600)
    share = hub.acquire(RedisConnection(url=redis_cluster.url, cluster=True, socket_timeout=2))
    try:
        partitioned, other = share.sweep.watch(tuple(streams), GROUP), share.sweep.watch(("other",), GROUP)
        await share.sweep.sweep()
        assert not partitioned.woken.is_set() and not other.woken.is_set()
        r.xadd(streams[2], {"m": "x"})
        await share.sweep.sweep()
        assert partitioned.woken.is_set() and not other.woken.is_set()
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


async def test_a_queue_at_rest_is_only_swept_and_wakes_at_its_first_message(
    redis_server: RedisServer,
) -> None:
    r = redis_server.client()
    r.xgroup_create("q", GROUP, id="0", mkstream=True)
    sink = StatusSink()
    settings = OperatorSettings(status_min_interval=10, rest_check_seconds=SWEEP_SECONDS)
    scaler = QueueScaler(sink, settings, "ns", "q")  # type: ignore[arg-type]
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
        for _ in range(3):
            await scaler.pause(0.2)  # several sweeps meanwhile: nothing wakes it
            await poll(at_zero)
        assert (_xinfo_calls(r, "stream"), sink.patches) == (full_polls, patches)  # no full poll
        body["metadata"]["annotations"] = {"note": "changed"}  # the objects changed: one full poll
        await poll(at_zero)
        assert _xinfo_calls(r, "stream") == full_polls + 1
        await poll(at_zero)
        r.xadd("q", {"m": "x"})
        # The sweep sees lag 1 and ends the pause long before its tick; that poll scales up.
        await asyncio.wait_for(scaler.pause(3600), timeout=10)
        await poll(at_zero)
        assert scaled == [(0, 1)]
    finally:
        await scaler.close()


class HangingPodList(StatusSink):
    """The API server of 2,000 queues' housekeeping: the pod listing waits (in the shared pool)."""

    def __init__(self) -> None:
        super().__init__()
        self.listing, self.release = asyncio.Event(), asyncio.Event()

    def fence(self) -> None:
        pass

    async def pod_names(self, namespace: str, label_selector: str) -> set[str]:
        self.listing.set()
        await self.release.wait()
        return set()


async def test_a_poll_never_waits_for_housekeeping(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Housekeeping falls due while its pod listing hangs: the polls go on and scale at once."""
    redis_server.client().xgroup_create("q", GROUP, id="0", mkstream=True)
    sink = HangingPodList()
    later = 0.0
    monkeypatch.setattr(scaler_module, "time", SimpleNamespace(monotonic=lambda: time.monotonic() + later))
    scaler = QueueScaler(sink, OperatorSettings(status_min_interval=10), "ns", "q")  # type: ignore[arg-type]
    body = {
        "metadata": {"generation": 1, "annotations": {}},
        "spec": {
            "redis": {"url": redis_server.url},
            "stream": "q",
            "group": GROUP,
            "scaling": {"minReplicas": 0},
        },
    }
    scaled: list[int] = []
    try:
        later = 3600.0  # housekeeping (every 30 s) is due
        await asyncio.wait_for(scaler.poll(body, Replicas(0, 0), lambda *_: None), timeout=10)
        await asyncio.wait_for(sink.listing.wait(), timeout=10)  # it runs, and hangs
        redis_server.client().xadd("q", {"m": "x"})
        poll = scaler.poll(body, Replicas(0, 0), lambda before, after, _: scaled.append(after))
        await asyncio.wait_for(poll, timeout=10)
        assert scaled == [1]
    finally:
        sink.release.set()
        await scaler.close()
