"""streamqueue-monitor against a real redis-server holding a real queue."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import pytest
import redis
from streamqueue import wire
from streamqueue.connection import RedisConnection, connect, connect_any
from streamqueue.monitor import count_streams, main
from streamqueue.observation import Observation
from streamqueue_operator.observe import observe as operator_observe


def _row(output: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is ``first_cell``."""
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row for {first_cell!r} in:\n{output}")


@pytest.fixture
def queue(redis_server) -> redis.Redis:
    """10 requests; w1 holds 3 unacked, w2 read 2 and acked 1; 5 never delivered; 2 dead letters."""
    r = redis_server.client(decode_responses=True)
    ids = [r.xadd(wire.DEFAULT_STREAM, {wire.USER_ID: f"u{i}", wire.MESSAGE: "m"}) for i in range(10)]
    r.xgroup_create(wire.DEFAULT_STREAM, wire.DEFAULT_GROUP, id="0")
    r.xreadgroup(wire.DEFAULT_GROUP, "w1", {wire.DEFAULT_STREAM: ">"}, count=3)
    r.xreadgroup(wire.DEFAULT_GROUP, "w2", {wire.DEFAULT_STREAM: ">"}, count=2)
    r.xack(wire.DEFAULT_STREAM, wire.DEFAULT_GROUP, ids[3])
    for user in ("u1", "u2", "u3"):
        r.xadd(wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, user), {wire.RESPONSE: "x"})
    r.set(wire.DEFAULT_REPLY_PREFIX + "not-a-stream", "1")  # same prefix, other type: not counted
    r.xadd("elsewhere:u1", {wire.RESPONSE: "x"})
    for _ in range(2):
        r.xadd(wire.dead_letter_stream(wire.DEFAULT_STREAM), {wire.DL_REASON: wire.REASON_MISSING_USER_ID})
    return r


def test_once_shows_group_consumers_pending_and_lag(queue, redis_server, capsys) -> None:
    assert main(["--once", "--redis-url", redis_server.url]) == 0
    out = capsys.readouterr().out
    assert _row(out, wire.DEFAULT_STREAM)[1:3] == ["10", "10"]  # length, entries-added
    assert _row(out, wire.DEFAULT_STREAM)[-2:] == [wire.dead_letter_stream(wire.DEFAULT_STREAM), "2"]
    # GROUP CONSUMERS PENDING LAG BACKLOG ENTRIES-READ
    assert _row(out, wire.DEFAULT_GROUP)[1:6] == ["2", "4", "5", "9", "5"]
    assert _row(out, "w1")[1] == "3"
    assert _row(out, "w2")[1] == "1"
    assert f"reply streams {wire.DEFAULT_REPLY_PREFIX}*: 3" in out


def test_lag_redis_cannot_tell_is_shown_unknown_not_zero(queue, redis_server, capsys) -> None:
    undelivered = queue.xrange(wire.DEFAULT_STREAM)[-1][0]
    queue.xdel(wire.DEFAULT_STREAM, undelivered)  # a tombstone past last-delivered: lag becomes nil
    assert main(["--once", "--redis-url", redis_server.url]) == 0
    row = _row(capsys.readouterr().out, wire.DEFAULT_GROUP)
    assert row[3:5] == ["unknown", ">=4"]


def test_any_queue_names_from_flags(redis_server, capsys) -> None:
    r = redis_server.client(decode_responses=True)
    r.xadd("orders", {wire.USER_ID: "u", wire.MESSAGE: "m"})
    r.xgroup_create("orders", "billing", id="0")
    r.xadd("orders-dlq", {wire.DL_REASON: "x"})
    r.xadd("reply.u1", {wire.RESPONSE: "x"})
    args = ["--once", "--redis-url", redis_server.url, "--stream", "orders", "--stream", "missing"]
    args += ["--dead-letter-stream", "orders-dlq", "--reply-prefix", "reply."]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert _row(out, "orders")[-2:] == ["orders-dlq", "1"]
    assert _row(out, "billing")[1:4] == ["0", "0", "1"]
    assert "stream missing: does not exist yet" in out
    assert "reply streams reply.*: 1" in out


def test_settings_come_from_the_worker_environment_variables(redis_server) -> None:
    r = redis_server.client(decode_responses=True)
    r.xadd("orders", {wire.USER_ID: "u", wire.MESSAGE: "m"})
    r.xgroup_create("orders", "billing", id="0")
    r.xadd("orders:dead", {wire.DL_REASON: "x"})
    env = {
        **os.environ,
        "STREAMQUEUE_REDIS_URL": redis_server.url,
        "STREAMQUEUE_STREAM": "orders",  # a plain name, exactly as the operator sets it for the worker
        "STREAMQUEUE_REPLY_PREFIX": "reply.",
    }
    script = os.path.join(os.path.dirname(sys.executable), "streamqueue-monitor")
    out = subprocess.run([script, "--once"], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert _row(out.stdout, "orders")[-2:] == ["orders:dead", "1"]
    assert _row(out.stdout, "billing")[1:4] == ["0", "0", "1"]
    assert "reply streams reply.*: 0" in out.stdout


def test_several_streams_from_commas_or_repeated_flags(redis_server, capsys) -> None:
    r = redis_server.client(decode_responses=True)
    for name in ("a", "b", "c"):
        r.xadd(name, {wire.USER_ID: "u", wire.MESSAGE: "m"})
    assert main(["--once", "--redis-url", redis_server.url, "--stream", "a,b", "--stream", "c"]) == 0
    out = capsys.readouterr().out
    assert [_row(out, name)[1] for name in ("a", "b", "c")] == ["1", "1", "1"]


@pytest.mark.parametrize("command", [["streamqueue-monitor"], ["python", "-m", "streamqueue.monitor"]])
def test_help_lists_the_options(command: list[str]) -> None:
    """The console script and ``python -m`` both reach the same CLI."""
    program = os.path.join(os.path.dirname(sys.executable), command[0])
    argv = [program, *command[1:], "--help"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.startswith("usage: streamqueue-monitor")
    flags = ("--once", "--interval", "--stream", "--reply-prefix", "--redis-url", "--scan-limit")
    for flag in (*flags, "--partitions", "--redis-cluster"):
        assert flag in out.stdout


def test_password_is_not_printed(redis_server, capsys) -> None:
    url = redis_server.url.replace("redis://", "redis://:s3cret@")
    main(["--once", "--redis-url", url])  # the server has no password: AUTH fails, which is fine here
    captured = capsys.readouterr()
    assert "s3cret" not in captured.out + captured.err


def test_unreachable_redis_fails_once_with_a_clear_message(capsys) -> None:
    assert main(["--once", "--redis-url", "redis://127.0.0.1:1/0"]) == 1
    assert "cannot read redis://127.0.0.1:1/0" in capsys.readouterr().err


async def test_reply_stream_count_is_bounded(redis_server) -> None:
    _reply_streams(redis_server.client(), wire.DEFAULT_REPLY_PREFIX, 5000)
    client = connect(RedisConnection(url=redis_server.url))
    try:
        assert await count_streams(client, wire.DEFAULT_REPLY_PREFIX, scan_limit=100_000) == (5000, True)
        count, complete = await count_streams(client, wire.DEFAULT_REPLY_PREFIX, scan_limit=1000)
        assert not complete and 0 < count < 5000
    finally:
        await client.aclose()


def test_a_key_of_another_type_is_an_error_not_a_missing_stream(redis_server, capsys) -> None:
    redis_server.client().set("not-a-stream", "x")
    assert main(["--once", "--redis-url", redis_server.url, "--stream", "not-a-stream"]) == 1
    assert "WRONGTYPE" in capsys.readouterr().err


# ---- partitioned queues, one Redis and a Redis Cluster ----------------------------------------------


def _cells(output: str, *first: str) -> list[str]:
    """The cells of the table row whose first cells are ``first``."""
    for line in output.splitlines():
        cells = line.split()
        if cells[: len(first)] == list(first):
            return cells
    raise AssertionError(f"no row for {first!r} in:\n{output}")


def _partitioned_queue(r: Any, stream: str, partitions: int, users: int) -> dict[int, int]:
    """``users`` users' requests routed the documented way; every partition's group created at 0;
    worker w1 reads 2 entries of every even partition, w2 all of partition 1 and acks one of them.
    Returns each partition's length."""
    lengths = dict.fromkeys(range(partitions), 0)
    for u in range(users):
        user = f"{stream}-u{u}"
        p = wire.partition_of(user, partitions)
        r.xadd(wire.partition_stream(stream, p, partitions), {wire.USER_ID: user, wire.MESSAGE: "m"})
        lengths[p] += 1
    for p in range(partitions):
        key = wire.partition_stream(stream, p, partitions)
        r.xgroup_create(key, wire.DEFAULT_GROUP, id="0", mkstream=True)
        if p % 2 == 0:
            r.xreadgroup(wire.DEFAULT_GROUP, "w1", {key: ">"}, count=2)
    key1 = wire.partition_stream(stream, 1, partitions)
    read = r.xreadgroup(wire.DEFAULT_GROUP, "w2", {key1: ">"})
    r.xack(key1, wire.DEFAULT_GROUP, read[0][1][0][0])
    r.xadd(wire.dead_letter_stream(wire.partition_stream(stream, 2, partitions)), {wire.DL_REASON: "x"})
    return lengths


def _check_partitioned(out: str, stream: str, partitions: int, lengths: dict[int, int]) -> None:
    assert all(n >= 3 for n in lengths.values()), lengths  # enough users that every partition has some
    total = sum(lengths.values())
    for p in range(partitions):
        key = wire.partition_stream(stream, p, partitions)
        # PARTITION STREAM LENGTH ENTRIES-ADDED LAST-ID DEAD-LETTER DEAD LEASE
        row = _cells(out, str(p), key)
        assert row[2:4] == [str(lengths[p])] * 2
        assert row[5:7] == [wire.dead_letter_stream(key), "1" if p == 2 else "0"]
        # GROUP PARTITION CONSUMERS PENDING LAG BACKLOG ENTRIES-READ
        group = _cells(out, wire.DEFAULT_GROUP, str(p))
        if p == 1:
            assert group[2:7] == ["1", str(lengths[p] - 1), "0", str(lengths[p] - 1), str(lengths[p])]
            assert _cells(out, "w2", "1")[2] == str(lengths[p] - 1)
        elif p % 2 == 0:
            assert group[2:7] == ["1", "2", str(lengths[p] - 2), str(lengths[p]), "2"]
            assert _cells(out, "w1", str(p))[2] == "2"
        else:
            assert group[2:7] == ["0", "0", str(lengths[p]), str(lengths[p]), "unknown"]  # never read
    assert _cells(out, "total", stream)[2:5] == [str(total), str(total), "1"]
    even = len(range(0, partitions, 2))
    pending = 2 * even + lengths[1] - 1
    read = 2 * even + lengths[1]
    # total: distinct consumers, pending, lag, backlog = pending + lag, entries read (a lower bound:
    # Redis cannot tell a group that never read partition 3)
    assert _cells(out, wire.DEFAULT_GROUP, "total")[2:7] == [
        "2", str(pending), str(total - read), str(total - read + pending), f">={read}"
    ]  # fmt: skip


def test_a_partitioned_queue_shows_each_partition_and_the_total(redis_server, capsys) -> None:
    r = redis_server.client(decode_responses=True)
    lengths = _partitioned_queue(r, "orders", 4, users=40)
    r.set(wire.lease_key(wire.partition_stream("orders", 3, 4)), "w1")  # ordering perUser
    assert main(["--once", "--redis-url", redis_server.url, "--stream", "orders", "--partitions", "4"]) == 0
    out = capsys.readouterr().out
    assert "queue orders: 4 partitions (configured)" in out
    _check_partitioned(out, "orders", 4, lengths)
    assert _cells(out, "3", "orders:{3}")[-1] == "w1"
    assert _cells(out, "0", "orders:{0}")[-1] == "-"


def test_partitions_are_detected_from_the_keys(redis_server, capsys) -> None:
    r = redis_server.client(decode_responses=True)
    lengths = _partitioned_queue(r, "orders", 5, users=50)
    r.xadd("plain", {wire.USER_ID: "u", wire.MESSAGE: "m"})
    assert main(["--once", "--redis-url", redis_server.url, "--stream", "orders,plain"]) == 0
    out = capsys.readouterr().out
    assert "queue orders: 5 partitions (detected from the keys)" in out
    _check_partitioned(out, "orders", 5, lengths)
    assert _row(out, "plain")[1:3] == ["1", "1"]  # an unpartitioned stream keeps its layout
    assert "queue plain" not in out


def test_partitions_not_created_yet_are_listed(redis_server, capsys) -> None:
    r = redis_server.client(decode_responses=True)
    r.xadd(wire.partition_stream("orders", 1, 3), {wire.USER_ID: "u", wire.MESSAGE: "m"})
    assert main(["--once", "--redis-url", redis_server.url, "--stream", "orders", "--partitions", "3"]) == 0
    out = capsys.readouterr().out
    assert "partitions not created yet: 0, 2" in out
    assert _cells(out, "total", "orders")[2] == "1"
    assert "(no consumer groups)" in out


@pytest.mark.slow
def test_a_partitioned_queue_on_a_redis_cluster(redis_cluster, capsys) -> None:
    r = redis_cluster.client(decode_responses=True)
    lengths = _partitioned_queue(r, "cq", 6, users=80)
    nodes = {redis_cluster.primary_for(wire.partition_stream("cq", p, 6)) for p in range(6)}
    assert len(nodes) > 1  # the partitions really are on different primaries
    prefix = "cq-reply:"
    users = [f"u{i}" for i in range(300)]
    for user in users:
        r.xadd(wire.reply_stream(prefix, user), {wire.RESPONSE: "x"})
    assert len({redis_cluster.primary_for(wire.reply_stream(prefix, u)) for u in users}) == 3
    args = ["--once", "--redis-cluster", "--redis-url", redis_cluster.url, "--stream", "cq"]
    assert main([*args, "--reply-prefix", prefix]) == 0
    out = capsys.readouterr().out
    assert "queue cq: 6 partitions (detected from the keys)" in out
    _check_partitioned(out, "cq", 6, lengths)
    assert f"reply streams {prefix}*: 300" in out  # every primary scanned


@pytest.mark.slow
async def test_the_reply_count_on_a_cluster_is_bounded_and_spread_over_the_primaries(redis_cluster) -> None:
    _reply_streams(redis_cluster.client(), "bounded:", 6000)
    client = connect_any(RedisConnection(url=redis_cluster.url, cluster=True))
    try:
        assert await count_streams(client, "bounded:", scan_limit=100_000) == (6000, True)
        count, complete = await count_streams(client, "bounded:", scan_limit=3000)
        assert not complete and 0 < count < 6000
    finally:
        await client.aclose()


@pytest.mark.slow
def test_an_unpartitioned_queue_on_a_cluster_from_the_environment(redis_cluster) -> None:
    r = redis_cluster.client(decode_responses=True)
    r.xadd("single", {wire.USER_ID: "u", wire.MESSAGE: "m"})
    r.xgroup_create("single", "billing", id="0")
    env = {
        **os.environ,
        "STREAMQUEUE_REDIS_URL": redis_cluster.url,
        "STREAMQUEUE_REDIS_CLUSTER": "true",
        "STREAMQUEUE_STREAM": "single",
        "STREAMQUEUE_PARTITIONS": "1",  # as the operator renders it for the worker
        "STREAMQUEUE_REPLY_PREFIX": "single-reply:",
    }
    script = os.path.join(os.path.dirname(sys.executable), "streamqueue-monitor")
    out = subprocess.run([script, "--once"], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert _row(out.stdout, "single")[1:3] == ["1", "1"]
    assert _row(out.stdout, "billing")[1:4] == ["0", "0", "1"]
    assert "queue single" not in out.stdout


def test_a_partitioned_queues_total_is_the_operators_count(redis_server, capsys) -> None:
    """A lag Redis cannot tell (a tombstone) and a partition no worker has started on: the monitor's total
    row shows the backlog the operator scales on, flagged as an upper bound."""
    r = redis_server.client(decode_responses=True)
    first, second = wire.partition_streams("est", 2)
    r.xgroup_create(first, wire.DEFAULT_GROUP, id="0", mkstream=True)
    ids = [r.xadd(first, {wire.USER_ID: "u", wire.MESSAGE: str(i)}) for i in range(6)]
    r.xreadgroup(wire.DEFAULT_GROUP, "w1", {first: ">"}, count=2)
    r.xdel(first, ids[4])  # Redis reports the group's lag as nil from now on
    for i in range(3):
        r.xadd(second, {wire.USER_ID: "v", wire.MESSAGE: str(i)})  # no group on this partition yet
    obs = asyncio.run(_operator_observation(redis_server.url, [first, second]))
    assert obs.lag_estimated and obs.lag >= 3 + 3
    assert main(["--once", "--redis-url", redis_server.url, "--stream", "est"]) == 0
    total = _cells(capsys.readouterr().out, wire.DEFAULT_GROUP, "total")
    assert total[3:6] == [str(obs.pending), f"<={obs.lag}", f"<={obs.backlog}"]


async def _operator_observation(url: str, streams: list[str]) -> Observation:
    client = connect(RedisConnection(url=url))
    try:
        return await operator_observe(client, streams, wire.DEFAULT_GROUP, at=0.0)
    finally:
        await client.aclose()


def _reply_streams(r: Any, prefix: str, count: int) -> None:
    """``count`` one-entry reply streams ``<prefix>u0`` ... (pipelined; on a cluster, by slot)."""
    pipe = r.pipeline(transaction=False)
    for i in range(count):
        pipe.xadd(f"{prefix}u{i}", {wire.RESPONSE: "x"})
    pipe.execute()
