"""streamqueue-monitor against a real redis-server holding a real queue."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis
from streamqueue import wire
from streamqueue.connection import RedisConnection, connect
from streamqueue.monitor import count_streams, main


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


def test_help_lists_the_options() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "streamqueue-monitor")
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60, check=True)
    for flag in ("--once", "--interval", "--stream", "--reply-prefix", "--redis-url", "--scan-limit"):
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
    r = redis_server.client()
    pipe = r.pipeline(transaction=False)
    for i in range(5000):
        pipe.xadd(f"{wire.DEFAULT_REPLY_PREFIX}u{i}", {wire.RESPONSE: "x"})
    pipe.execute()
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
