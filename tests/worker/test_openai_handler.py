"""The model handler against a real OpenAI-compatible server (llama-cpp-python's, on a tiny model the
test generates) and, for the statuses that server cannot be made to return, a stub speaking the same
streaming format on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import redis
from aiohttp import web
from streamqueue import Client, wire
from streamqueue.handlers import Message, close_handler, load_handler
from streamqueue.handlers.openai import (
    Memory,
    ModelContextTooLong,
    ModelError,
    ModelRequestError,
    ModelStreamBroken,
    OpenAIHandler,
    _status_error,
)
from streamqueue.settings import WorkerSettings
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.modelserver import (
    completion_chunk,
    stream_completion,
)

from tests.worker.conftest import Attempts, replies, send

MODEL_HANDLER = "streamqueue.handlers.openai:handle"


def msg(text: str = "hi", user: str = "alice") -> Message:
    return Message(id="1-0", stream="s", user_id=user, message=text, request_id="r1", deliveries=1)


async def collect(handler: OpenAIHandler, message: Message) -> list[str]:
    return [chunk async for chunk in handler(message)]


@pytest.fixture
async def handlers() -> AsyncIterator[Callable[..., OpenAIHandler]]:
    built: list[OpenAIHandler] = []

    def build(base_url: str, **kwargs) -> OpenAIHandler:
        built.append(OpenAIHandler(base_url, **kwargs))
        return built[-1]

    yield build
    for handler in built:
        await close_handler(handler)


# --- the real server ---------------------------------------------------------------------------


async def test_real_llama_server_streams_chunks_through_a_worker(llama, settings, workers, raw) -> None:
    s = settings(
        handler=MODEL_HANDLER,
        openai_base_url=llama.base_url,
        openai_model="tiny",
        openai_max_tokens=8,
        chunk_flush_ms=0,  # an entry per token: the tiny model's 8 come within a few ms
    )
    await workers.start(s)
    async with Client(s.redis_url) as client:
        chunks = [c async for c in client.request_stream("alice", "hello model", request_id="q1", timeout=60)]
    assert len(chunks) >= 2, chunks  # streamed token by token, not one block
    [final] = [f for f in replies(raw, "alice") if wire.RESPONSE in f]
    assert final[wire.RESPONSE] == "".join(chunks) and final[wire.REQUEST_ID] == "q1"
    streamed = [f[wire.CHUNK] for f in replies(raw, "alice") if wire.CHUNK in f and wire.RESPONSE not in f]
    assert streamed == chunks
    assert all(isinstance(c, str) and c.entry_id for c in chunks)


async def test_real_llama_server_context_too_long(llama, handlers) -> None:
    """The real server's refusal, in both of its forms.

    Without streaming it answers 400 with OpenAI's body (``code: context_length_exceeded``), which the
    handler maps to ``ModelContextTooLong``. Streaming, llama-cpp-python has already sent 200 when it
    finds out, and just ends the event stream: the handler sees no ``data: [DONE]`` and can only
    treat it like a broken connection (vLLM and OpenAI check before streaming and answer 400).
    """
    too_long = "hello world " * 400
    body = {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": too_long}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{llama.base_url}/chat/completions", json=body) as response,
    ):
        status, text = response.status, await response.text()
    assert status == 400
    mapped = _status_error(status, text, {})
    assert isinstance(mapped, ModelContextTooLong)
    assert "maximum context length is 512 tokens" in str(mapped)

    handler = handlers(llama.base_url, model="tiny", max_tokens=8, retries=0)
    with pytest.raises(ModelError, match=r"ended without data: \[DONE\] \(after 1 attempts\)"):
        await collect(handler, msg(too_long))


async def test_real_llama_server_with_memory_and_system_prompt(llama, settings, workers, raw) -> None:
    s = settings(
        handler=MODEL_HANDLER,
        openai_base_url=llama.base_url,
        openai_max_tokens=4,
        openai_system_prompt="You are terse.",
        openai_memory_turns=2,
        openai_memory_ttl_seconds=600,
    )
    await workers.start(s)
    async with Client(s.redis_url) as client:
        answers = [(await client.request("bob", f"question {i}", timeout=60)).response for i in range(3)]
    key = wire.memory_key(s.stream, "bob")
    remembered = [json.loads(item) for item in raw.lrange(key, 0, -1)]
    assert remembered == [{"user": f"question {i}", "assistant": answers[i]} for i in (1, 2)]
    assert 0 < raw.ttl(key) <= 600


# --- error mapping, against the stub -----------------------------------------------------------


async def test_429_waits_retry_after_then_streams(stub, handlers) -> None:
    seen: list[tuple[float, str | None]] = []

    async def respond(request: web.Request) -> web.StreamResponse:
        seen.append((time.monotonic(), request.headers.get("Authorization")))
        if len(seen) == 1:
            return web.json_response(
                {
                    "error": {
                        "message": "Rate limit reached",
                        "type": "requests",
                        "code": "rate_limit_exceeded",
                    }
                },
                status=429,
                headers={"Retry-After": "1"},
            )
        return await stream_completion(request, ["Hel", "lo", "!"])

    handler = handlers((await stub(respond)).base_url, api_key="sk-test", retries=2)
    assert await collect(handler, msg()) == ["Hel", "lo", "!"]
    assert len(seen) == 2
    assert seen[1][0] - seen[0][0] >= 0.95  # waited what Retry-After said (the default backoff is 0.2 s)
    assert seen[0][1] == "Bearer sk-test"


async def test_5xx_and_timeouts_are_retried_with_backoff(stub, handlers) -> None:
    @Attempts
    async def respond(request: web.Request, attempt: int) -> web.StreamResponse:
        if attempt == 1:
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if attempt == 2:
            await asyncio.sleep(2)  # longer than the handler's timeout: no first token in time
        return await stream_completion(request, ["ok"])

    handler = handlers((await stub(respond.handler)).base_url, retries=3, timeout_s=0.5)
    assert await collect(handler, msg()) == ["ok"]
    assert respond.calls == 3


async def test_5xx_gives_up_after_the_retries(stub, handlers) -> None:
    @Attempts
    async def respond(request: web.Request, attempt: int) -> web.StreamResponse:
        return web.json_response({"error": {"message": "model crashed"}}, status=500)

    handler = handlers((await stub(respond.handler)).base_url, retries=1)
    with pytest.raises(ModelError, match=r"HTTP 500: model crashed \(after 2 attempts\)"):
        await collect(handler, msg())
    assert respond.calls == 2


@pytest.mark.parametrize(
    ("status", "body", "error", "reason"),
    [
        (
            400,
            {
                "error": {
                    "message": "This model's maximum context length is 8192 tokens.",
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "context_length_exceeded",
                }
            },
            ModelContextTooLong,
            "context length exceeded",
        ),
        (401, {"error": {"message": "Incorrect API key provided"}}, ModelRequestError, "HTTP 401.*API key"),
        (404, {"error": {"message": "The model `nope` does not exist"}}, ModelRequestError, "HTTP 404"),
    ],
)
async def test_client_errors_fail_at_once(stub, handlers, status, body, error, reason) -> None:
    @Attempts
    async def respond(request: web.Request, attempt: int) -> web.StreamResponse:
        return web.json_response(body, status=status)

    handler = handlers((await stub(respond.handler)).base_url, retries=3)
    with pytest.raises(error, match=reason):
        await collect(handler, msg())
    assert respond.calls == 1


async def test_a_stream_broken_after_chunks_is_not_retried(stub, handlers) -> None:
    @Attempts
    async def respond(request: web.Request, attempt: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(completion_chunk("partial "))
        await response.write_eof()  # ends without data: [DONE]
        return response

    handler = handlers((await stub(respond.handler)).base_url, retries=3)
    got: list[str] = []
    with pytest.raises(ModelStreamBroken, match="after 1 chunks"):
        async for chunk in handler(msg()):
            got.append(chunk)
    assert got == ["partial "] and respond.calls == 1


async def test_request_body_carries_system_prompt_memory_and_limits(stub, handlers, redis_server) -> None:
    bodies: list[dict] = []

    async def respond(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        return await stream_completion(request, [f"answer {len(bodies)}"])

    from streamqueue.connection import RedisConnection, connect

    memory = Memory(connect(RedisConnection(url=redis_server.url)), "q", turns=1, ttl_s=60)
    handler = handlers((await stub(respond)).base_url, model="m", system_prompt="Be brief.", max_tokens=7,
                       memory=memory)  # fmt: skip
    await collect(handler, msg("first"))
    await collect(handler, msg("second"))
    await collect(handler, msg("third"))
    assert bodies[2] == {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},  # the tokens for a tokens-per-minute limit
        "max_tokens": 7,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "second"},  # only the last exchange: turns=1
            {"role": "assistant", "content": "answer 2"},
            {"role": "user", "content": "third"},
        ],
    }


async def test_a_chat_entry_sends_its_messages_and_parameters(stub, handlers, redis_server) -> None:
    """An entry with a ``chat`` field (the gateway's) is sent as the system prompt and the chat's own
    messages, with its sampling parameters (max_tokens capped by the handler's); memory is neither
    read nor written for it, and the usage the server reports lands in ``final_fields``."""
    bodies: list[dict] = []

    async def respond(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        response = await stream_completion(request, ["a", "b"])
        return response

    from streamqueue.connection import RedisConnection, connect

    memory = Memory(connect(RedisConnection(url=redis_server.url)), "q", turns=3, ttl_s=60)
    handler = handlers((await stub(respond)).base_url, system_prompt="Be brief.", max_tokens=7, memory=memory)
    chat = {
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                     {"role": "user", "content": [{"type": "text", "text": "z"}]}],
        "max_tokens": 50, "temperature": 0.5, "stop": ["\n"], "logit_bias": {"1": 2},
    }  # fmt: skip
    message = Message(id="1-0", stream="q", user_id="alice", message="z", request_id="r1", deliveries=1,
                      fields={wire.CHAT: json.dumps(chat)})  # fmt: skip
    assert await collect(handler, message) == ["a", "b"]
    assert bodies[0]["messages"] == [{"role": "system", "content": "Be brief."}, *chat["messages"]]
    assert bodies[0]["max_tokens"] == 7 and bodies[0]["temperature"] == 0.5 and bodies[0]["stop"] == ["\n"]
    assert "logit_bias" not in bodies[0]  # only wire.CHAT_PARAMS are passed on
    assert await memory.load("alice") == []


async def test_usage_the_server_reports_is_on_the_final_reply(stub, settings, workers, raw) -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}

    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(completion_chunk("hey"))
        await response.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    s = settings(handler=MODEL_HANDLER, openai_base_url=(await stub(respond)).base_url)
    await workers.start(s)
    async with Client(s.redis_url) as client:
        stream = client.request_stream("alice", "z", chat={"messages": [{"role": "user", "content": "z"}]})
        assert [c async for c in stream] == ["hey"]
    assert stream.final is not None and stream.final.usage == usage


async def test_memory_on_a_redis_cluster_carries_the_first_exchange(stub, redis_cluster) -> None:
    """The handler built from the worker's settings keeps its memory on the cluster the worker uses
    (it once dialled it with the single-server client, which refuses a cluster connection)."""
    bodies: list[dict] = []

    async def respond(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        return await stream_completion(request, [f"answer {len(bodies)}"])

    s = WorkerSettings(
        redis_url=redis_cluster.url, redis_cluster=True, stream="memq", handler=MODEL_HANDLER,
        openai_base_url=(await stub(respond)).base_url, openai_memory_turns=1, openai_memory_ttl_seconds=60,
    )  # fmt: skip
    handler = load_handler(MODEL_HANDLER, s)
    try:
        await collect(handler, msg("first", user="carol"))
        await collect(handler, msg("second", user="carol"))
    finally:
        await close_handler(handler)
    assert bodies[1]["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer 1"},
        {"role": "user", "content": "second"},
    ]
    stored = redis_cluster.client(decode_responses=True).lrange(wire.memory_key("memq", "carol"), 0, -1)
    assert [json.loads(item) for item in stored] == [{"user": "second", "assistant": "answer 2"}]


async def test_context_too_long_is_dead_lettered_with_the_reason(stub, settings, workers, raw) -> None:
    async def respond(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "error": {
                    "message": "maximum context length is 4096 tokens",
                    "code": "context_length_exceeded",
                }
            },
            status=400,
        )

    server = await stub(respond)
    s = settings(handler=MODEL_HANDLER, openai_base_url=server.base_url, max_deliveries=1)
    await workers.start(s)
    send(raw, "carol", "a very long prompt", request_id="long")
    dead = await eventually_async(lambda: raw.xrange(s.dead_letter()), "a dead-letter entry", timeout=30)
    [(_, record)] = dead
    assert "context length exceeded" in json.dumps(record)
    error_reply = await eventually_async(
        lambda: [f for f in replies(raw, "carol") if wire.ERROR in f], "the user's error reply", timeout=10
    )
    assert error_reply[0][wire.REQUEST_ID] == "long"


def test_model_handler_settings_and_secret() -> None:
    with pytest.raises(ValueError, match="OPENAI_BASE_URL"):
        load_handler(MODEL_HANDLER, WorkerSettings())
    env = {"STREAMQUEUE_OPENAI_BASE_URL": "http://127.0.0.1:1/v1/", "STREAMQUEUE_OPENAI_API_KEY": "sk-secret"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        s = WorkerSettings()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert "sk-secret" not in repr(s) and "sk-secret" not in json.dumps(s.model_dump(mode="json"))
    handler = load_handler(MODEL_HANDLER, s)
    assert isinstance(handler, OpenAIHandler)
    assert handler.url == "http://127.0.0.1:1/v1/chat/completions"
    assert handler.pool.headers["Authorization"] == "Bearer sk-secret"


def test_tiny_model_generator_is_a_plain_script() -> None:
    """tinymodel.py runs under the llama venv's Python: it must not import the harness or the worker."""
    source = (Path(__file__).parents[2] / "harness/streamqueue_harness/tinymodel.py").read_text()
    assert "streamqueue" not in "".join(
        line for line in source.splitlines() if line.startswith(("import", "from"))
    )


_ = redis  # the ``raw`` fixture's type
