"""Streamed chunks of many concurrent replies, written through the outbox: complete, in order, exactly
once, each on its own user's stream; what may be queued is bounded; on one server and on a cluster."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from streamqueue import Client, wire
from streamqueue.connection import RedisConnection, connect
from streamqueue.handlers import Message
from streamqueue.metrics import WorkerMetrics
from streamqueue.settings import WorkerSettings
from streamqueue.worker.chunks import ChunkWriteFailed, ChunkWriter
from streamqueue.worker.outbox import Outbox
from streamqueue.worker.worker import Worker
from streamqueue_harness.eventually import eventually_async

CHUNKS = 12


async def interleaved(msg: Message) -> AsyncIterator[str]:
    """Chunks named after the request, each after a random short pause: replies interleave."""
    for i in range(CHUNKS):
        await asyncio.sleep(random.random() / 500)
        yield f"{msg.request_id}:{i} "


def expected(request_id: str) -> list[str]:
    return [f"{request_id}:{i} " for i in range(CHUNKS)]


async def stream_all(client: Client, users: list[str], rounds: int) -> dict[str, list[str]]:
    """Every user streams ``rounds`` requests one after another, all users at once."""
    got: dict[str, list[str]] = {}

    async def user(name: str) -> None:
        for n in range(rounds):
            request_id = f"{name}-{n}"
            stream = client.request_stream(name, "go", request_id=request_id, timeout=30)
            got[request_id] = [str(chunk) async for chunk in stream]

    await asyncio.wait_for(asyncio.gather(*(user(u) for u in users)), 120)
    return got


def check_reply_streams(r: Any, users: list[str], rounds: int, coalesced: bool = False) -> None:
    """What any reader of the streams sees: per request its chunks in order, once each, then the final
    entry with the whole text; nothing of another user's. ``coalesced``: an entry may hold several
    chunks (numbered entry by entry, each with the reply's characters before it as ``offset``)."""
    for name in users:
        entries = [fields for _, fields in r.xrange(wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, name))]
        mine = {f"{name}-{n}" for n in range(rounds)}
        assert {f[wire.REQUEST_ID] for f in entries} == mine
        for request_id in mine:
            own = [f for f in entries if f[wire.REQUEST_ID] == request_id]
            chunks, final = own[:-1], own[-1]
            texts = [f[wire.CHUNK] for f in chunks]
            if coalesced:
                assert "".join(texts) == "".join(expected(request_id))
            else:
                assert texts == expected(request_id)
            assert [int(f[wire.SEQ]) for f in chunks] == list(range(len(chunks)))
            offsets = [len("".join(texts[:i])) for i in range(len(texts))]
            assert [int(f[wire.OFFSET]) for f in chunks] == offsets
            assert final[wire.RESPONSE] == "".join(expected(request_id))


@pytest.mark.parametrize("flush_ms", [0, 20])
async def test_chunks_of_many_concurrent_replies_arrive_complete_in_order_once(
    settings, workers, raw, flush_ms
) -> None:
    """Coalescing (``chunk_flush_ms`` > 0) joins chunks into fewer entries: the same text, in order."""
    await workers.start(
        settings(concurrency=300, batch_size=100, chunk_flush_ms=flush_ms), handler=interleaved
    )
    users = [f"u{u}" for u in range(300)]
    async with Client(settings().redis_url) as client:
        got = await stream_all(client, users, rounds=2)
    joined = {request_id: "".join(chunks) for request_id, chunks in got.items()}
    assert joined == {f"{u}-{n}": "".join(expected(f"{u}-{n}")) for u in users for n in range(2)}
    if not flush_ms:
        assert got == {f"{u}-{n}": expected(f"{u}-{n}") for u in users for n in range(2)}
    check_reply_streams(raw, users, rounds=2, coalesced=bool(flush_ms))
    assert all(0 < raw.ttl(wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, u)) <= 3600 for u in users)


@pytest.fixture
async def outbox(redis_server) -> AsyncIterator[Outbox]:
    redis = connect(RedisConnection(url=redis_server.url))
    yield Outbox(redis, "requests", "group", WorkerMetrics())
    await redis.aclose()


async def test_queued_chunks_stay_within_the_bound_while_redis_does_not_take_them(outbox, raw) -> None:
    writer = ChunkWriter(outbox, max_chunks=30)
    passed = 0

    async def produce(u: int) -> None:
        nonlocal passed
        reply = writer.reply(f"ai_to_user:u{u}", "w1", f"r{u}", None, 60)
        for i in range(20):
            await reply.write(f"u{u}c{i}")
            passed += 1
            assert writer.queued <= 30
        await reply.written()

    producers = [asyncio.create_task(produce(u)) for u in range(10)]
    # The flusher is not running yet: to the writers, Redis takes nothing.
    await eventually_async(lambda: passed == 30, "the bound to fill up", timeout=10)
    for _ in range(100):
        await asyncio.sleep(0)  # every producer gets its turn, and must keep waiting
    assert passed == 30
    flusher = asyncio.create_task(outbox.run())
    try:
        await asyncio.wait_for(asyncio.gather(*producers), 30)
    finally:
        flusher.cancel()
    assert writer.queued == 0
    for u in range(10):
        entries = [fields for _, fields in raw.xrange(f"ai_to_user:u{u}")]
        assert [f[wire.CHUNK] for f in entries] == [f"u{u}c{i}" for i in range(20)]
        assert [int(f[wire.SEQ]) for f in entries] == list(range(20))
        assert 0 < raw.ttl(f"ai_to_user:u{u}") <= 60  # the first chunk gave the stream its lifetime


async def test_a_chunk_larger_than_the_text_bound_goes_alone(outbox, raw) -> None:
    writer = ChunkWriter(outbox, max_text=10)
    reply = writer.reply("ai_to_user:big", "w1", "r1", None, None)
    flusher = asyncio.create_task(outbox.run())
    try:
        for i in range(3):
            await asyncio.wait_for(reply.write(f"{i}" * 100), 10)
        await asyncio.wait_for(reply.written(), 10)
    finally:
        flusher.cancel()
    assert [f[wire.CHUNK] for _, f in raw.xrange("ai_to_user:big")] == [f"{i}" * 100 for i in range(3)]


async def test_chunks_given_up_at_shutdown_fail_their_reply(outbox) -> None:
    writer = ChunkWriter(outbox)
    reply = writer.reply("ai_to_user:late", "w1", "r1", None, None)
    await reply.write("never written")
    outbox.abandon()  # the shutdown deadline passed with Redis unreachable
    flusher = asyncio.create_task(outbox.run())
    try:
        with pytest.raises(ChunkWriteFailed, match="not written"):
            await asyncio.wait_for(reply.written(), 10)
        with pytest.raises(ChunkWriteFailed):
            await reply.write("nor this")
    finally:
        flusher.cancel()


async def test_chunks_on_a_redis_cluster_arrive_complete_and_in_order(redis_cluster) -> None:
    """Reply streams live in their users' slots, all over the cluster: the outbox writes them with a
    pipeline per node, and the client reads each slot's streams with its own XREAD."""
    s = WorkerSettings(
        redis_url=redis_cluster.url, redis_cluster=True, consumer="c1", stream="chunkq", block_ms=100,
        claim_idle_ms=300, health_port=0, shutdown_grace_seconds=10, concurrency=100,
    )  # fmt: skip
    worker = Worker(s, handler=interleaved)
    running = asyncio.create_task(worker.run())
    users = [f"cu{u}" for u in range(60)]
    try:
        await eventually_async(lambda: worker.ready, "the worker", timeout=30)
        connection = RedisConnection(url=redis_cluster.url, cluster=True)
        async with Client(connection, stream="chunkq") as client:
            got = await stream_all(client, users, rounds=2)
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 30)
    joined = {request_id: "".join(chunks) for request_id, chunks in got.items()}
    assert joined == {f"{u}-{n}": "".join(expected(f"{u}-{n}")) for u in users for n in range(2)}
    r = redis_cluster.client(decode_responses=True)
    check_reply_streams(r, users, rounds=2, coalesced=True)
    keys = [wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, u) for u in users]
    assert len({redis_cluster.primary_for(key) for key in keys}) == 3  # every node had some
