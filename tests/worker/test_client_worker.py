"""streamqueue.Client round trips against a real Worker on a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis
from redis.exceptions import ResponseError
from streamqueue import Client, wire
from streamqueue.settings import WorkerSettings
from streamqueue.worker import Worker
from streamqueue_harness.eventually import eventually_async

StartWorker = Callable[..., Awaitable[Worker]]


async def _listening(client: Client, user_id: str) -> None:
    """Wait until the user's reader has taken its position: replies from then on are delivered."""
    await asyncio.sleep(0)  # one step of the subscriber's task creates the reader
    assert await asyncio.wait_for(client.listening(user_id), timeout=10)


async def _wait_for_group(raw: redis.Redis, stream: str, group: str) -> None:
    """Requests sent before the worker's group exists could be skipped by a group made at ``$``."""

    def exists() -> bool:
        try:
            return any(g["name"] == group.encode() for g in raw.xinfo_groups(stream))
        except ResponseError:  # the stream does not exist yet
            return False

    await eventually_async(exists, f"the group {group}", timeout=30)


@pytest.fixture
async def client(redis_server) -> AsyncIterator[Client]:
    async with Client(redis_server.url, block_ms=200) as c:
        yield c


@pytest.fixture
async def start_worker(redis_server, client: Client) -> AsyncIterator[StartWorker]:
    """Start in-process Workers (article defaults unless overridden); stopped at teardown."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(handler: object = None, **overrides: object) -> Worker:
        settings = WorkerSettings(redis_url=redis_server.url, block_ms=100, health_port=0, **overrides)
        worker = Worker(settings, handler=handler)
        running.append((worker, asyncio.create_task(worker.run())))
        await _wait_for_group(redis_server.client(), settings.stream, settings.group)
        return worker

    yield start
    for worker, _ in running:
        worker.request_stop()
    await asyncio.wait_for(asyncio.gather(*(task for _, task in running)), timeout=30)


async def test_request_round_trip(client: Client, start_worker: StartWorker) -> None:
    await start_worker(consumer="w1")
    reply = await client.request("alice", "hello", request_id="r-1", timeout=10)
    assert (reply.response, reply.request_id, reply.worker_id) == ("Echo: hello", "r-1", "w1")


async def test_concurrent_requests_for_one_user_are_demultiplexed(
    client: Client, start_worker: StartWorker
) -> None:
    await start_worker(batch_size=50, concurrency=50)
    messages = [f"message {i}" for i in range(300)]
    replies = await asyncio.gather(*(client.request("alice", m, timeout=30) for m in messages))
    assert [r.response for r in replies] == [f"Echo: {m}" for m in messages]


async def test_many_users_each_get_only_their_own_replies(
    client: Client, start_worker: StartWorker, redis_server
) -> None:
    await start_worker(batch_size=20, concurrency=40)
    users = [f"user{u}" for u in range(25)]
    sent = {user: [f"{user}-req{i}" for i in range(8)] for user in users}
    replies = await asyncio.gather(
        *(
            client.request(user, f"{user} asks {rid}", request_id=rid, timeout=30)
            for user, rids in sent.items()
            for rid in rids
        )
    )
    assert all(r.response == f"Echo: {r.request_id.split('-')[0]} asks {r.request_id}" for r in replies)
    raw = redis_server.client(decode_responses=True)
    for user, rids in sent.items():
        on_stream = raw.xrange(wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, user))
        assert sorted(fields[wire.REQUEST_ID] for _, fields in on_stream) == sorted(rids)


async def test_streamed_chunks_arrive_in_order(client: Client, start_worker: StartWorker) -> None:
    async def words(msg):  # an async-iterator handler streams its reply
        for word in msg.message.split():
            await asyncio.sleep(0.005)
            yield word + " "

    await start_worker(handler=words, stream_replies=True)
    text = "one two three four five six seven eight nine ten"
    chunks = [c async for c in client.request_stream("alice", text, timeout=10)]
    # The worker joins chunks that wait together (chunk_flush_ms): the text is what stays the same.
    assert "".join(chunks) == "".join(w + " " for w in text.split())


async def test_streamed_reply_still_ends_with_the_whole_response(
    client: Client, start_worker: StartWorker
) -> None:
    async def words(msg):
        for word in msg.message.split():
            yield word

    await start_worker(handler=words, stream_replies=True, chunk_flush_ms=0)  # an entry per chunk
    seen = client.responses("bob")
    collect = asyncio.create_task(_until_final(seen))
    await _listening(client, "bob")
    async for _ in client.request_stream("bob", "a b c", timeout=10):
        pass
    entries = await asyncio.wait_for(collect, timeout=10)
    assert [e.chunk for e in entries[:-1]] == ["a", "b", "c"]
    assert [e.seq for e in entries[:-1]] == [0, 1, 2]
    assert entries[-1].response == "abc"


async def _until_final(replies: AsyncIterator) -> list:
    entries = []
    async for reply in replies:
        entries.append(reply)
        if not reply.is_chunk:
            return entries
    return entries


async def test_the_same_client_works_again_after_a_redis_restart(
    client: Client, start_worker: StartWorker, redis_server
) -> None:
    await start_worker()
    assert (await client.request("alice", "before", timeout=10)).response == "Echo: before"
    redis_server.stop()  # no persistence: the queue, the group and the reply streams are gone
    redis_server.start()
    # The worker recreates its group; the client's pool reconnects and a new reader starts.
    reply = await client.request("alice", "after", timeout=30)
    assert reply.response == "Echo: after"
