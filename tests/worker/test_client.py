"""streamqueue.Client against a real redis-server and a scripted replier.

The replier writes exactly the reply entries a test needs (out of order, duplicated, errors), which
the real worker never does on purpose; round trips against the real Worker are in
test_client_worker.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from streamqueue import Client, wire
from streamqueue.client import Reply, ReplyError
from streamqueue_harness.eventually import eventually_async

Fields = dict[str, str]
Script = Callable[[Fields], list[Fields]]


async def _replier(url: str, script: Script, *, batch: int = 1, shuffle: bool = False) -> None:
    """Read requests like a worker would and write the entries ``script`` returns for each."""
    redis = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        await redis.xgroup_create(wire.DEFAULT_STREAM, "replier", id="0", mkstream=True)
        while True:
            result = await redis.xreadgroup(
                "replier", "r", {wire.DEFAULT_STREAM: ">"}, count=batch, block=100
            )
            entries = [fields for _, items in result or [] for _, fields in items]
            if shuffle:
                random.shuffle(entries)
            for fields in entries:
                for reply in script(fields):
                    key = wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, fields[wire.USER_ID])
                    await redis.xadd(key, reply)
    finally:
        await redis.aclose()


async def _listening(client: Client, user_id: str) -> None:
    """Wait until the user's reader has taken its position: replies from then on are delivered."""
    await asyncio.sleep(0)  # one step of the subscriber's task creates the reader
    assert await asyncio.wait_for(client.listening(user_id), timeout=10)


def echo(fields: Fields) -> list[Fields]:
    return [{wire.RESPONSE: f"Echo: {fields[wire.MESSAGE]}", wire.REQUEST_ID: fields[wire.REQUEST_ID]}]


@pytest.fixture
async def client(redis_server) -> AsyncIterator[Client]:
    async with Client(redis_server.url, block_ms=200) as c:
        yield c


@pytest.fixture
def replier(redis_server):
    """Start a replier with a script; cancelled at teardown."""
    tasks: list[asyncio.Task[None]] = []

    def start(script: Script = echo, **kwargs: object) -> None:
        tasks.append(asyncio.create_task(_replier(redis_server.url, script, **kwargs)))  # type: ignore[arg-type]

    yield start
    for task in tasks:
        task.cancel()


async def test_send_is_the_article_plain_xadd(client: Client, redis_server) -> None:
    entry_id = await client.send("alice", "hi")
    [(got_id, fields)] = redis_server.client(decode_responses=True).xrange(wire.DEFAULT_STREAM)
    assert got_id == entry_id
    assert set(fields) == {wire.USER_ID, wire.MESSAGE, wire.TIMESTAMP}
    assert (fields[wire.USER_ID], fields[wire.MESSAGE]) == ("alice", "hi")
    float(fields[wire.TIMESTAMP])


async def test_send_trims_the_input_stream_when_asked(redis_server) -> None:
    async with Client(redis_server.url, stream_maxlen=10) as client:
        for i in range(500):
            await client.send("alice", str(i), request_id=str(i))
    # MAXLEN ~ trims whole radix-tree nodes (100 entries by default), never below 10.
    assert 10 <= redis_server.client().xlen(wire.DEFAULT_STREAM) <= 200


async def test_request_returns_the_reply_with_its_request_id(client: Client, replier) -> None:
    replier()
    reply = await client.request("alice", "hello", request_id="req-1", timeout=5)
    assert (reply.response, reply.request_id) == ("Echo: hello", "req-1")


async def test_concurrent_requests_for_one_user_each_get_their_own_reply(client: Client, replier) -> None:
    replier(batch=50, shuffle=True)  # replies land in a different order than the requests
    messages = [f"m{i}" for i in range(200)]
    replies = await asyncio.gather(*(client.request("alice", m, timeout=10) for m in messages))
    assert [r.response for r in replies] == [f"Echo: {m}" for m in messages]
    assert client.reader_count <= 1  # one reader for the user's stream, not one per request


async def test_an_old_reply_with_the_same_request_id_is_not_taken_for_the_new_one(
    client: Client, replier, redis_server
) -> None:
    key = wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, "alice")
    redis_server.client().xadd(key, {wire.RESPONSE: "stale", wire.REQUEST_ID: "same"})
    replier()
    reply = await client.request("alice", "fresh", request_id="same", timeout=5)
    assert reply.response == "Echo: fresh"


async def test_error_reply_raises_reply_error(client: Client, replier) -> None:
    replier(lambda f: [{wire.ERROR: "handler failed", wire.REQUEST_ID: f[wire.REQUEST_ID]}])
    with pytest.raises(ReplyError, match="handler failed") as info:
        await client.request("alice", "boom", timeout=5)
    assert info.value.reply.error == "handler failed"


async def test_timeout_leaves_no_waiter_and_the_reader_retires(client: Client) -> None:
    with pytest.raises(TimeoutError):
        await client.request("alice", "nobody answers", timeout=0.3)
    assert not client.awaited_requests("alice")
    # the reader retires after one empty BLOCK (200 ms)
    await eventually_async(lambda: client.reader_count == 0, "the idle reader to retire", timeout=5)


async def test_a_late_reply_after_a_timeout_goes_only_to_subscribers(client: Client, redis_server) -> None:
    with pytest.raises(TimeoutError):
        await client.request("alice", "slow", request_id="late", timeout=0.2)
    seen = client.responses("alice")
    first = asyncio.create_task(anext(seen))
    await _listening(client, "alice")
    key = wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, "alice")
    redis_server.client().xadd(key, {wire.RESPONSE: "too late", wire.REQUEST_ID: "late"})
    reply = await asyncio.wait_for(first, timeout=5)
    assert reply.response == "too late"
    await seen.aclose()


def _chunked(parts: list[str], order: list[int]) -> Script:
    def script(fields: Fields) -> list[Fields]:
        rid = fields[wire.REQUEST_ID]
        chunks = [{wire.CHUNK: parts[i], wire.SEQ: str(i), wire.REQUEST_ID: rid} for i in order]
        return [*chunks, {wire.RESPONSE: "".join(parts), wire.REQUEST_ID: rid}]

    return script


async def test_request_stream_yields_chunks_in_sequence_order(client: Client, replier) -> None:
    parts = ["The ", "quick ", "brown ", "fox"]
    replier(_chunked(parts, order=[1, 0, 3, 2]))
    got = [chunk async for chunk in client.request_stream("alice", "tell me", timeout=5)]
    assert got == parts


async def test_request_stream_skips_chunks_repeated_by_a_redelivery(client: Client, replier) -> None:
    parts = ["a", "b", "c"]
    replier(_chunked(parts, order=[0, 1, 0, 1, 2]))  # a second worker restarted the stream
    got = [chunk async for chunk in client.request_stream("alice", "x", timeout=5)]
    assert got == parts


async def test_request_stream_of_a_plain_reply_yields_it_whole(client: Client, replier) -> None:
    replier()
    got = [chunk async for chunk in client.request_stream("alice", "x", timeout=5)]
    assert got == ["Echo: x"]


async def test_request_stream_raises_on_an_error_reply(client: Client, replier) -> None:
    replier(lambda f: [{wire.ERROR: "nope", wire.REQUEST_ID: f[wire.REQUEST_ID]}])
    with pytest.raises(ReplyError, match="nope"):
        async for _ in client.request_stream("alice", "x", timeout=5):
            pass


async def test_responses_sees_replies_to_requests_sent_elsewhere(
    client: Client, replier, redis_server
) -> None:
    replier()
    seen = client.responses("bob")
    first = asyncio.create_task(anext(seen))
    await _listening(client, "bob")
    async with Client(redis_server.url) as other:
        await other.request("bob", "from another process", request_id="x1", timeout=5)
    reply: Reply = await asyncio.wait_for(first, timeout=5)
    assert (reply.response, reply.request_id) == ("Echo: from another process", "x1")
    await seen.aclose()


@pytest.mark.parametrize("user_id", ["", "a b", "x" * 200, "ai_to_user:*"])
async def test_invalid_user_id_is_refused_before_sending(client: Client, redis_server, user_id: str) -> None:
    with pytest.raises(ValueError, match="user_id"):
        await client.request(user_id, "hi", timeout=1)
    assert redis_server.client().xlen(wire.DEFAULT_STREAM) == 0


async def test_oversized_message_is_refused_before_sending(redis_server) -> None:
    async with Client(redis_server.url, max_message_bytes=10) as client:
        with pytest.raises(ValueError, match="message_too_large"):
            await client.send("alice", "x" * 11)


@pytest.mark.parametrize(
    ("chat", "why"),
    [
        ({"messages": []}, "non-empty messages list"),
        ({"messages": [{"content": "hi"}], "max_tokens": "16"}, "max_tokens must be a positive integer"),
        ({"messages": [{"content": "x" * 200}]}, "message_too_large"),
    ],
)
async def test_a_chat_the_worker_would_dead_letter_is_refused_before_sending(
    redis_server, chat: dict[str, object], why: str
) -> None:
    async with Client(redis_server.url, max_message_bytes=100) as client:
        with pytest.raises(ValueError, match=why):
            await client.send("alice", "hi", chat=chat)
    assert redis_server.client().xlen(wire.DEFAULT_STREAM) == 0


async def test_close_fails_pending_requests(redis_server) -> None:
    client = Client(redis_server.url)
    pending = asyncio.create_task(client.request("alice", "never answered", request_id="n1", timeout=30))
    await eventually_async(
        lambda: "n1" in client.awaited_requests("alice"), "the request in flight", timeout=5
    )
    await client.close()
    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.wait_for(pending, timeout=5)


async def test_cancelling_a_request_removes_its_waiter(client: Client) -> None:
    task = asyncio.create_task(client.request("alice", "cancel me", request_id="c1", timeout=30))
    await eventually_async(
        lambda: "c1" in client.awaited_requests("alice"), "the request in flight", timeout=5
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "c1" not in client.awaited_requests("alice")
