"""Resuming a streamed reply after a dropped connection: every chunk exactly once and in order, against
a real redis-server and a real (in-process) worker. Through the gateway's event streams (browsers):
tests/gateway/test_browser_api.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from streamqueue import Client, wire
from streamqueue.client import Chunk, entry_key
from streamqueue.handlers import Message
from streamqueue_harness.ports import free_port

from tests.worker.conftest import replies

WORDS = [f"w{i} " for i in range(9)]
TEXT = "".join(WORDS)


async def read_until(chunks: AsyncIterator[str], got: list[str], text: str) -> None:
    """Append chunks to ``got`` until they spell ``text``: the worker may join chunks that wait
    together into one entry (``chunk_flush_ms``), so the number of chunks is not fixed, the text is."""
    while len("".join(got)) < len(text):
        got.append(await anext(chunks))
    assert "".join(got) == text


class GatedHandler:
    """Streams WORDS in three thirds; the second and third wait for the test to open their gate."""

    def __init__(self) -> None:
        self.gates = [asyncio.Event(), asyncio.Event()]
        self.waiting = [asyncio.Event(), asyncio.Event()]
        self.done = asyncio.Event()

    async def __call__(self, msg: Message) -> AsyncIterator[str]:
        for third in range(3):
            if third:
                self.waiting[third - 1].set()
                await asyncio.wait_for(self.gates[third - 1].wait(), 30)
            for word in WORDS[third * 3 : third * 3 + 3]:
                yield word
        self.done.set()  # every chunk was handed to the worker (queued; not necessarily written yet)


async def test_responses_after_an_entry_yields_the_rest_once_then_new_ones(redis_server) -> None:
    key = wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, "alice")
    async with Client(redis_server.url) as client:
        ids = [await client.redis.xadd(key, {wire.CHUNK: f"c{i}", wire.SEQ: i}) for i in range(5)]
        seen = []
        stream = client.responses("alice", after=ids[1])
        async for reply in stream:
            seen.append(reply.entry_id)
            if len(seen) == 3:  # the backlog is out: add live entries
                ids += [await client.redis.xadd(key, {wire.CHUNK: f"c{i}", wire.SEQ: i}) for i in (5, 6)]
            if len(seen) == 5:
                break
        await stream.aclose()
    assert seen == ids[2:]


async def test_request_stream_resumes_after_a_dropped_connection(settings, workers, raw) -> None:
    handler = GatedHandler()
    s = settings()
    await workers.start(s, handler=handler)
    async with Client(s.redis_url) as first:
        stream = first.request_stream("alice", "tell me", request_id="r1", timeout=30)
        got: list[Chunk] = []
        await read_until(stream, got, "".join(WORDS[:3]))
        await stream.aclose()  # the connection drops after the first three words
    last = got[-1].entry_id
    handler.gates[0].set()  # three more chunks are written while nobody listens
    await asyncio.wait_for(handler.waiting[1].wait(), 30)
    async with Client(s.redis_url) as second:
        resumed = second.request_stream("alice", "", request_id="r1", after=last, timeout=30)
        await read_until(resumed, got, "".join(WORDS[:6]))  # from the backlog
        handler.gates[1].set()  # the rest arrives live
        got += [chunk async for chunk in resumed]
    assert "".join(got) == TEXT
    assert [c.entry_id for c in got] == sorted(
        {c.entry_id for c in got}, key=entry_key
    )  # once each, in order
    [final] = [f for f in replies(raw, "alice") if wire.RESPONSE in f]
    assert final[wire.RESPONSE] == "".join(got)
    async with Client(s.redis_url) as third:  # resuming after the last chunk gives nothing more
        final_id = raw.xrevrange(wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, "alice"), count=1)[0][0]
        assert [c async for c in third.request_stream("alice", "", request_id="r1", after=final_id)] == []
        assert "".join(
            [c async for c in third.request_stream("alice", "", request_id="r1", after="0-0")]
        ) == ("".join(WORDS))


async def test_resuming_needs_the_request_id() -> None:
    async with Client(f"redis://127.0.0.1:{free_port()}/0") as client:
        with pytest.raises(ValueError, match="request_id"):
            await anext(client.request_stream("alice", "", after="1-0"))
