"""``Client.cancel`` against a real redis-server and real (in-process) workers: a queued request is
skipped, a running one has its handler cancelled and its chunks stop, a finished or unknown one is left
alone; on a partitioned queue, with the request on one of two workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis
from streamqueue import Client, wire
from streamqueue.aio import cancel
from streamqueue.client import RequestCancelled
from streamqueue.connection import RedisConnection, connect
from streamqueue.handlers import Message
from streamqueue.worker import Worker
from streamqueue.worker.cancel import CancelWatch
from streamqueue_harness.eventually import eventually_async

from tests.worker.conftest import group_settled, replies


class SlowStream:
    """``"slow"`` streams a chunk every 50 ms until cancelled; anything else is echoed at once."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.saw_cancel = asyncio.Event()

    async def __call__(self, msg: Message) -> AsyncIterator[str]:
        self.calls.append(msg.message)
        if msg.message != "slow":
            yield f"echo: {msg.message}"
            return
        try:
            for i in range(10_000):
                yield f"c{i} "
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.saw_cancel.set()
            raise


def reply_key(user: str) -> str:
    return wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, user)


def settled(r: redis.Redis, stream: str) -> bool:
    try:
        groups = r.xinfo_groups(stream)
    except redis.ResponseError:
        return False
    return any(g["name"] == wire.DEFAULT_GROUP and g["pending"] == 0 and g["lag"] == 0 for g in groups)


async def test_cancel_before_pickup_skips_the_queued_request(settings, workers, raw) -> None:
    s = settings()
    handler = SlowStream()
    async with Client(s.redis_url) as client:
        await client.send("alice", "slow", request_id="r1")
        await client.cancel("alice", "r1")
        assert raw.zscore(wire.cancel_key(wire.DEFAULT_STREAM), "alice:r1") is not None
        await workers.start(s, handler=handler)
        await eventually_async(lambda: bool(replies(raw, "alice")), "the cancelled reply", timeout=15)
        await eventually_async(lambda: group_settled(raw), "r1 acknowledged", timeout=15)
        # The worker goes on serving the user.
        assert (await client.request("alice", "next", timeout=15)).response == "echo: next"
    [cancelled, answered] = [f for f in replies(raw, "alice") if wire.RESPONSE in f]
    assert cancelled[wire.CANCELLED] == "1"
    assert cancelled[wire.RESPONSE] == ""
    assert cancelled[wire.REQUEST_ID] == "r1"
    assert cancelled[wire.WORKER_ID] == "w1"
    assert wire.TIMESTAMP in cancelled
    assert answered[wire.RESPONSE] == "echo: next"
    assert handler.calls == ["next"]  # the cancelled request never reached the handler


async def test_cancel_mid_stream_stops_the_chunks_on_a_partitioned_queue(settings, raw) -> None:
    """Two workers on two partitions; whichever holds the request hears of the cancel."""
    handler = SlowStream()
    fleet = [Worker(settings(consumer=f"w{n}", partitions=2), handler=handler) for n in (1, 2)]
    tasks = [asyncio.create_task(w.run()) for w in fleet]
    try:
        await eventually_async(lambda: all(w.ready for w in fleet), "both workers reading", timeout=15)
        got = await _stream_then_cancel(fleet[0].settings.redis_url, handler)
        partition = wire.partition_stream(wire.DEFAULT_STREAM, wire.partition_of("alice", 2), 2)
        await eventually_async(lambda: settled(raw, partition), "r1 acknowledged", timeout=15)
    finally:
        for w in fleet:
            w.request_stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    entries = replies(raw, "alice")
    [final_at] = [i for i, f in enumerate(entries) if f.get(wire.REQUEST_ID) == "r1" and wire.RESPONSE in f]
    chunks = [f[wire.CHUNK] for f in entries[:final_at] if f.get(wire.REQUEST_ID) == "r1"]
    assert chunks[:3] == got[:3] == ["c0 ", "c1 ", "c2 "]
    assert chunks == [f"c{i} " for i in range(len(chunks))]
    assert len(chunks) < 20  # stopped within a few chunks of the cancel, not after the 10,000
    assert entries[final_at][wire.CANCELLED] == "1"
    assert entries[final_at][wire.RESPONSE] == ""
    assert all(f.get(wire.REQUEST_ID) != "r1" for f in entries[final_at + 1 :])  # nothing after it


async def _stream_then_cancel(url: str, handler: SlowStream) -> list[str]:
    """Stream r1, cancel it after three chunks; returns the chunks the client got."""
    async with Client(url, partitions=2) as client:
        got: list[str] = []
        stream = client.request_stream("alice", "slow", request_id="r1", timeout=15)
        with pytest.raises(RequestCancelled) as cancelled:
            async for chunk in stream:
                got.append(chunk)
                if len(got) == 3:
                    await client.cancel("alice", "r1")
        assert cancelled.value.reply.cancelled
        await asyncio.wait_for(handler.saw_cancel.wait(), 15)
        # The consumer that ran it serves the next request.
        assert (await client.request("alice", "next", timeout=15)).response == "echo: next"
    return got


async def test_cancel_while_waiting_behind_the_users_earlier_request(settings, workers, raw) -> None:
    """Per-user order: the second request, already read but waiting its turn, is skipped when it comes."""
    handler = SlowStream()
    s = settings(ordering="perUser", lease_ttl_ms=1000)
    await workers.start(s, handler=handler)
    async with Client(s.redis_url) as client:
        stream = client.request_stream("alice", "slow", request_id="r1", timeout=15)
        await anext(stream)  # r1 runs; r2 is read behind it
        await client.send("alice", "queued", request_id="r2")
        await eventually_async(lambda: settled_lag(raw), "r2 delivered to the worker", timeout=15)
        await client.cancel("alice", "r2")
        await client.cancel("alice", "r1")
        with pytest.raises(RequestCancelled):
            async for _ in stream:
                pass
        await eventually_async(lambda: group_settled(raw), "both acknowledged", timeout=15)
    finals = [f for f in replies(raw, "alice") if wire.RESPONSE in f]
    assert [(f[wire.REQUEST_ID], f[wire.CANCELLED]) for f in finals] == [("r1", "1"), ("r2", "1")]
    assert handler.calls == ["slow"]


def settled_lag(r: redis.Redis) -> bool:
    """Everything in the stream was delivered (lag 0), whether or not acknowledged yet."""
    groups = r.xinfo_groups(wire.DEFAULT_STREAM)
    return any(g["name"] == wire.DEFAULT_GROUP and g["lag"] == 0 and g["pending"] == 2 for g in groups)


async def test_cancel_after_completion_writes_nothing(settings, workers, raw) -> None:
    s = settings()
    await workers.start(s, handler=SlowStream())
    async with Client(s.redis_url) as client:
        assert (await client.request("alice", "hi", request_id="r1", timeout=15)).response == "echo: hi"
        await client.cancel("alice", "r1")
        # A later request's reply is written after the worker had the cancel announced to it.
        assert (await client.request("alice", "again", request_id="r2", timeout=15)).response == "echo: again"
    finals = [f for f in replies(raw, "alice") if wire.RESPONSE in f]
    assert [(f[wire.REQUEST_ID], f[wire.RESPONSE]) for f in finals] == [
        ("r1", "echo: hi"),
        ("r2", "echo: again"),
    ]
    assert all(wire.CANCELLED not in f for f in replies(raw, "alice"))
    assert group_settled(raw)


async def test_cancel_of_an_unknown_request_is_a_no_op(settings, workers, raw) -> None:
    s = settings()
    await workers.start(s, handler=SlowStream())
    async with Client(s.redis_url) as client:
        await client.cancel("alice", "never-sent")
        assert (await client.request("alice", "hi", request_id="r1", timeout=15)).response == "echo: hi"
        with pytest.raises(ValueError):
            await client.cancel("alice", "")
        with pytest.raises(ValueError):
            await client.cancel("no:colons", "r1")
    assert {f[wire.REQUEST_ID] for f in replies(raw, "alice")} == {"r1"}
    assert all(wire.CANCELLED not in f for f in replies(raw, "alice"))
    assert group_settled(raw)
    key = wire.cancel_key(wire.DEFAULT_STREAM)
    assert 0 < raw.pttl(key) <= wire.DEFAULT_CANCEL_TTL_SECONDS * 1000  # the record expires by itself


async def test_old_cancels_are_trimmed(redis_server, raw) -> None:
    key = wire.cancel_key(wire.DEFAULT_STREAM)
    raw.zadd(key, {"alice:ancient": 1})
    async with Client(redis_server.url, cancel_ttl_seconds=60) as client:
        await client.cancel("alice", "r1")
    assert raw.zrange(key, 0, -1) == ["alice:r1"]


def _subscribe_denials(r: redis.Redis, user: str) -> int:
    """How often ``user`` was refused SUBSCRIBE: Redis counts repeats of one denial in one ACL LOG entry."""
    return sum(e["count"] for e in r.acl_log() if e["username"] == user and e["object"] == "subscribe")


async def test_a_refused_subscription_backs_off_instead_of_retrying_at_once(redis_server, raw) -> None:
    """A user without SUBSCRIBE: the watch retries on the backoff's schedule (at least 1.5 s from the first
    refusal to the seventh: 25 ms, 50 ms, ... doubling), not in a loop (it once made ~35 tries a second)."""
    raw.acl_setuser("nosub", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                    commands=["+@all", "-subscribe"])  # fmt: skip
    watch = CancelWatch(connect(RedisConnection(url=redis_server.url, username="nosub", password="pw")), "q")
    running = asyncio.create_task(watch.run())
    try:
        await eventually_async(lambda: _subscribe_denials(raw, "nosub") >= 1, "the first refusal")
        first = time.monotonic()
        await eventually_async(lambda: _subscribe_denials(raw, "nosub") >= 7, "the seventh refusal")
        assert time.monotonic() - first > 1.0
        assert not watch.subscribed.is_set()
    finally:
        await cancel(running)
        await watch.redis.aclose()
