"""Resuming a streamed reply after a dropped connection: every chunk exactly once and in order, against
a real redis-server and a real (in-process) worker, directly and through the SSE front end example."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from streamqueue import Client, wire
from streamqueue.client import Chunk, entry_key
from streamqueue.handlers import Message
from streamqueue_harness.eventually import eventually_async
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


def _load_example():  # type: ignore[no-untyped-def]
    path = Path(__file__).parents[2] / "examples" / "sse_frontend.py"
    spec = importlib.util.spec_from_file_location("sse_frontend", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, str]]:
    event: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if event:
                yield event
            event = {}
            continue
        name, _, value = line.partition(": ")
        event[name] = value


async def test_sse_front_end_resumes_with_last_event_id(settings, workers, raw) -> None:
    handler = GatedHandler()
    s = settings()
    await workers.start(s, handler=handler)
    example = _load_example()
    app = example.make_app(s.redis_url)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/requests", json={"user_id": "bob", "message": "hi"}) as created:
                assert created.status == 202
                events_url = base + (await created.json())["events"]
            got: list[dict[str, str]] = []
            async with http.get(events_url) as response:
                async for event in _sse_events(response):
                    got.append(event)
                    if "".join(json.loads(e["data"]) for e in got) == "".join(WORDS[:3]):
                        break  # leaving the block drops the connection mid-stream
            handler.gates[0].set()
            await asyncio.wait_for(handler.waiting[1].wait(), 30)
            handler.gates[1].set()
            await asyncio.wait_for(handler.done.wait(), 30)
            # The dropped stream is released once the front end fails to write its next chunk; a
            # reconnection before that would find the request still awaited by the dead one.
            await eventually_async(
                lambda: not app[example.CLIENT].awaited_requests("bob"), "the dropped stream's end", 30
            )
            headers = {"Last-Event-ID": got[-1]["id"]}
            async with http.get(events_url, headers=headers) as response:
                got += [event async for event in _sse_events(response)]
    finally:
        await runner.cleanup()
    chunks, done = got[:-1], got[-1]
    assert "".join(json.loads(e["data"]) for e in chunks) == TEXT
    assert len({e["id"] for e in chunks}) == len(chunks)
    assert done["event"] == "done" and "id" not in done
