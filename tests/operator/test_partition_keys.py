"""Every Redis read and write of a partitioned queue uses its partitions' keys, never the bare stream name.

A partitioned queue ``pk`` has no key ``pk``: a command on it fails (XINFO) or silently sees an empty
queue (XREADGROUP with MKSTREAM, EXISTS). So one walk drives what touches a queue's keys — a worker
round trip through the client (per-user ordering and fairness: leases and fair keys too), the
operator's observation, pod ranking and housekeeping, and the monitor's observation — and

- on one redis-server, MONITOR records every command (a script's own commands included) and
  ``COMMAND GETKEYS`` names their keys: none may be the bare stream name;
- on the Redis Cluster fixture, where the partitions live on different nodes, every step must succeed
  (a cross-slot command is refused there), the operator must log no Redis error and no key may have
  the bare name afterwards.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from streamqueue import wire
from streamqueue.client import Client
from streamqueue.connection import RedisConnection, connect_any
from streamqueue.monitor import MonitorSettings
from streamqueue.monitor import observe as monitor_observe
from streamqueue.settings import WorkerSettings
from streamqueue.worker import Worker
from streamqueue_harness.redis_cluster import RedisClusterServer
from streamqueue_harness.redis_server import RedisServer
from streamqueue_operator.models import parse_spec
from streamqueue_operator.scaler import QueueScaler
from streamqueue_operator.settings import OperatorSettings

from tests.operator.pods import PodAnnotations

STREAM, GROUP, PARTITIONS = "pk", "pk-group", 3
WORKER, DEAD_POD = "w-1", "gone-1"
USERS = [f"user-{i}" for i in range(6)]  # spread over the three partitions
_MARKER = "partition-keys-walk-done"


class KeyRecorder:
    """Every command a redis-server runs while recording (MONITOR), as argument lists."""

    _ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')

    def __init__(self, server: RedisServer) -> None:
        self._server = server
        self._monitor = server.client().monitor()
        self._monitor.__enter__()  # MONITOR answered: every later command is recorded
        self.commands: list[list[str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            line = self._monitor.connection.read_response()
            text = line.decode("utf-8", "replace") if isinstance(line, bytes) else str(line)
            args = [
                codecs.escape_decode(a.encode())[0].decode("utf-8", "replace")
                for a in self._ARG.findall(text)
            ]
            if args == ["ECHO", _MARKER]:
                return
            self.commands.append(args)

    def stop(self) -> None:
        """Returns once the server has reported every command sent before (MONITOR keeps their order)."""
        self._server.client().echo(_MARKER)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "MONITOR never reported the end marker"
        self._monitor.__exit__()

    def keys(self) -> set[str]:
        """The keys of every recorded command, as the server itself extracts them."""
        unique = list({tuple(c) for c in self.commands if c})
        pipe = self._server.client(decode_responses=True).pipeline(transaction=False)
        for command in unique:
            pipe.command_getkeys(*command)
        replies = pipe.execute(raise_on_error=False)
        return {key for reply in replies if not isinstance(reply, Exception) for key in reply}


async def _walk(url: str, cluster: bool) -> None:
    """Drive every component's reads and writes of the partitioned queue once."""
    streams = wire.partition_streams(STREAM, PARTITIONS)
    worker = Worker(
        WorkerSettings(
            redis_url=url, redis_cluster=cluster, stream=STREAM, group=GROUP, partitions=PARTITIONS,
            consumer=WORKER, ordering="perUser", fairness="perUser", block_ms=100, claim_idle_ms=300,
            health_port=0, shutdown_grace_seconds=10,
        )
    )  # fmt: skip
    running = asyncio.create_task(worker.run())
    try:
        async with Client(
            RedisConnection(url=url, cluster=cluster), stream=STREAM, partitions=PARTITIONS
        ) as client:
            replies = [await client.request(user, "hello", timeout=30) for user in USERS]
        assert [r.response for r in replies] == ["Echo: hello"] * len(USERS)
        await _operator_reads(url, cluster, streams)
        snapshot = await _monitor_reads(url, cluster)
        [queue] = snapshot.streams
        assert (queue.partitions, [p.name for p in queue.parts]) == (PARTITIONS, streams)
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 30)


async def _operator_reads(url: str, cluster: bool, streams: list[str]) -> None:
    """The scaler's observation, pod ranking and housekeeping, as one poll runs them."""
    admin = connect_any(RedisConnection(url=url, cluster=cluster))
    await admin.xgroup_createconsumer(streams[0], GROUP, DEAD_POD)  # a consumer whose pod is gone
    await admin.aclose()
    pods = PodAnnotations(WORKER)  # the worker's pod is live
    scaler = QueueScaler(pods, OperatorSettings(status_min_interval=10), "ns", "q")  # type: ignore[arg-type]
    spec = parse_spec(
        {
            "redis": {"url": url, "cluster": cluster},
            **{"stream": STREAM, "group": GROUP, "partitions": PARTITIONS},
            "housekeeping": {"deadConsumerCleanup": True, "trimStream": True},
        }
    )
    try:
        obs = await scaler._observe(spec)
        assert obs.ok and [s for s, _ in obs.partitions] == streams, obs
        await scaler._rank_pods_for_removal(spec)
        assert pods.annotations[WORKER] is not None
        scaler._start_housekeeping(spec, time.monotonic() + 3600)  # due: it runs beside the poll
        assert scaler._housekeeping_run is not None
        await scaler._housekeeping_run
    finally:
        await scaler.close()


async def _monitor_reads(url: str, cluster: bool) -> Any:
    settings = MonitorSettings(redis_url=url, redis_cluster=cluster, stream=[STREAM])  # partitions detected
    client = connect_any(settings.redis_connection())
    try:
        return await monitor_observe(client, settings)
    finally:
        await client.aclose()


@pytest.fixture
def no_operator_redis_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The scaler logs (and survives) a failed ranking or housekeeping read: here that is a failure."""
    with caplog.at_level(logging.WARNING, logger="streamqueue.scaler"):
        yield
    assert [r.getMessage() for r in caplog.records if r.name.startswith("streamqueue.scaler")] == []


async def test_no_command_touches_the_bare_stream_name(
    redis_server: RedisServer, no_operator_redis_errors: None
) -> None:
    recorder = KeyRecorder(redis_server)
    try:
        await _walk(redis_server.url, cluster=False)
    finally:
        recorder.stop()
    keys = recorder.keys()
    assert STREAM not in keys, [c for c in recorder.commands if STREAM in c]
    assert set(wire.partition_streams(STREAM, PARTITIONS)) <= keys


async def test_every_read_and_write_works_on_a_cluster(
    redis_cluster: RedisClusterServer, no_operator_redis_errors: None
) -> None:
    streams = wire.partition_streams(STREAM, PARTITIONS)
    assert len({redis_cluster.primary_for(s) for s in streams}) > 1  # the partitions span nodes
    await _walk(redis_cluster.url, cluster=True)
    assert not redis_cluster.client().exists(STREAM)  # nothing wrote the bare name either
