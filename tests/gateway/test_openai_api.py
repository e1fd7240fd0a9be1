"""The OpenAI API of the gateway through the official ``openai`` SDK (and curl), against a real
redis-server and real worker processes: the numbered-tokens handler, and the model handler in front
of a chat-completions stub or llama-cpp-python's server on a tiny model."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from streamqueue_gateway.auth import Principal
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.modelserver import ModelServer, completion_chunk
from streamqueue_harness.processes import stop_groups
from streamqueue_harness.token_handler import tokens
from streamqueue_harness.workerproc import spawn_worker

from tests.gateway.conftest import KEYS, MODEL_HANDLER, TOKENS_HANDLER, RunningGateway, sse_events


def sdk(gateway: RunningGateway, user: str = "alice") -> openai.AsyncOpenAI:
    """The SDK as an application uses it; no retries, so a refusal shows as it is."""
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEYS[user], max_retries=0)


def ask(count: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"tokens={count}"}]


async def test_a_chat_completion_through_the_sdk(gateways, workers) -> None:
    workers()
    gateway = await gateways()
    async with sdk(gateway) as client:
        completion = await client.chat.completions.create(model="tokens", messages=ask(5))
    assert completion.choices[0].message.content == "".join(tokens(5))
    assert completion.choices[0].finish_reason == "stop" and completion.model == "tokens"
    assert completion.usage is not None and completion.usage.total_tokens > 0  # estimated: no model usage


async def test_a_streamed_chat_completion_with_usage_through_the_sdk(gateways, workers) -> None:
    workers()
    gateway = await gateways()
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(
            model="tokens", messages=ask(8), stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(tokens(8))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert not chunks[-1].choices and chunks[-1].usage is not None  # the usage chunk comes last
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


async def test_models_lists_the_configured_models(gateways, gateway_config) -> None:
    gateway = await gateways(gateway_config(models=[{"name": "tokens"}, {"name": "llama", "stream": "q2"}]))
    async with sdk(gateway) as client:
        listed = await client.models.list()
    assert [m.id for m in listed.data] == ["tokens", "llama"]


async def test_refusals_are_openai_errors(gateways) -> None:
    gateway = await gateways()
    async with sdk(gateway) as client:
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(model="nope", messages=ask(1))
        with pytest.raises(openai.BadRequestError) as invalid:
            await client.chat.completions.create(model="tokens", messages=[])
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="tokens", messages=ask(1), temperature=5)
    assert unknown.value.code == "model_not_found" and invalid.value.param == "messages"
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()


async def test_over_quota_is_429_with_retry_after(gateways, gateway_config, workers) -> None:
    """bob's tier allows one request at a time: a second while the first streams is refused."""
    workers(tokens_interval_ms="50")
    gateway = await gateways(gateway_config(tiers={"pro": {}, "free": {"maxRequests": 1}}))
    async with sdk(gateway, "bob") as client:
        first = await client.chat.completions.create(model="tokens", messages=ask(40), stream=True)
        await anext(aiter(first))  # admitted and streaming
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="tokens", messages=ask(1))
        await first.close()
    assert int(refused.value.response.headers["Retry-After"]) >= 1
    assert refused.value.code == "max_requests"


async def test_a_stream_is_admitted_while_its_reply_reader_takes_position(
    gateways, gateway_config, workers, redis_server, monkeypatch
) -> None:
    """The quota decision overlaps the reply reader's positioning (one round trip less before the
    send): here the admission waits for the reader, which never came while they ran in turn. A
    streamed request the quota refuses is answered 429 and never queued."""
    workers()
    gateway = await gateways(gateway_config(tiers={"pro": {"tokensPerMinute": 1}, "free": {}}))
    quotas, client = gateway.state.quotas, gateway.state.queues["tokens"].client
    admit = quotas.admit

    async def admit_once_the_reader_exists(principal: Principal, request_id: str) -> Any:
        await eventually_async(lambda: client.reader_count > 0, "the reply reader", timeout=5)
        return await admit(principal, request_id)

    monkeypatch.setattr(quotas, "admit", admit_once_the_reader_exists)
    async with sdk(gateway) as client_sdk:
        stream = await client_sdk.chat.completions.create(model="tokens", messages=ask(3), stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "".join(
            tokens(3)
        )
        with pytest.raises(openai.RateLimitError) as refused:  # its tokens are debited: 1 a minute
            await client_sdk.chat.completions.create(model="tokens", messages=ask(3), stream=True)
    assert refused.value.code == "tokens_per_minute"
    assert redis_server.client().xlen("user_messages_queue") == 1


async def test_a_backlog_above_the_limit_is_503_with_retry_after(
    gateways, gateway_config, redis_server
) -> None:
    r = redis_server.client(decode_responses=True)
    r.xgroup_create("user_messages_queue", "ai_service_group", id="$", mkstream=True)
    for i in range(3):
        r.xadd("user_messages_queue", {"user_id": "x", "message": str(i)})
    gateway = await gateways(gateway_config(models=[{"name": "tokens", "maxBacklog": 2}]))
    async with sdk(gateway) as client:
        with pytest.raises(openai.InternalServerError) as overloaded:
            await client.chat.completions.create(model="tokens", messages=ask(1))
    assert overloaded.value.status_code == 503 and "Retry-After" in overloaded.value.response.headers


async def test_curl_streams_a_completion(gateways, workers) -> None:
    workers()
    gateway = await gateways()
    body = json.dumps({"model": "tokens", "messages": ask(3), "stream": True})
    auth = f"Authorization: Bearer {KEYS['alice']}"
    command = ["curl", "-sN", f"{gateway.url}/v1/chat/completions", "-H", auth,
               "-H", "Content-Type: application/json", "-d", body]  # fmt: skip
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)
    events = [line.removeprefix("data: ") for line in done.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(deltas) == "".join(tokens(3))


async def test_the_model_handler_gets_the_chat_and_its_usage_reaches_the_caller(
    gateways, workers, stub
) -> None:
    bodies: list[dict[str, Any]] = []
    usage = {"prompt_tokens": 17, "completion_tokens": 2, "total_tokens": 19}

    async def respond(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ("Hello", " there"):
            await response.write(completion_chunk(word))
        await response.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    server = await stub(respond)
    workers(handler=MODEL_HANDLER, openai_base_url=server.base_url, openai_system_prompt="Be kind.")
    gateway = await gateways()
    messages = [{"role": "system", "content": "Answer in English."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]  # fmt: skip
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(
            model="tokens", messages=messages, stream=True, stream_options={"include_usage": True},
            max_tokens=9, temperature=0.25,
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there"
    assert chunks[-1].usage is not None and chunks[-1].usage.model_dump() == usage | {
        "completion_tokens_details": None, "prompt_tokens_details": None,
    }  # fmt: skip
    [body] = bodies
    assert body["messages"] == [{"role": "system", "content": "Be kind."}, *messages]
    assert body["max_tokens"] == 9 and body["temperature"] == 0.25


async def test_a_chat_through_the_gateway_to_a_real_llama_server(
    gateways, workers, llama: ModelServer
) -> None:
    workers(handler=MODEL_HANDLER, openai_base_url=llama.base_url, openai_model="tiny", openai_max_tokens="8")
    gateway = await gateways()
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(
            model="tokens", messages=[{"role": "user", "content": "hello"}], stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2  # streamed token by token
    # llama-cpp-python streams no usage: the gateway's estimate (a quarter of the characters) stands in
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


async def test_metrics_count_requests_rejections_tokens_and_first_tokens_per_tier(gateways, workers) -> None:
    workers()
    gateway = await gateways()
    async with sdk(gateway) as client:
        await client.chat.completions.create(model="tokens", messages=ask(3))
        stream = await client.chat.completions.create(model="tokens", messages=ask(3), stream=True)
        assert len([chunk async for chunk in stream]) > 1
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="tokens", messages=ask(3))
    registry = gateway.state.metrics.registry
    labels = {"model": "tokens", "tier": "pro"}
    assert registry.get_sample_value("streamqueue_gateway_requests_total", {**labels, "outcome": "ok"}) == 2
    assert registry.get_sample_value("streamqueue_gateway_time_to_first_token_seconds_count", labels) == 2
    assert (registry.get_sample_value("streamqueue_gateway_tokens_total", {"tier": "pro"}) or 0) > 0
    assert (
        registry.get_sample_value("streamqueue_gateway_rejected_total", {"tier": "", "reason": "auth"}) == 1
    )
    assert registry.get_sample_value("streamqueue_gateway_active_streams", {"tier": "pro"}) == 0


@pytest.mark.parametrize(("max_backlog", "reason"), [(10, "redis"), (0, "quotas")])
async def test_a_refusal_because_redis_did_not_answer_is_counted_under_its_own_reason(
    gateways, gateway_config, redis_server, max_backlog: int, reason: str
) -> None:
    """The backlog read (``redis``) or the quota call (``quotas``) failing is not a backlog refusal."""
    config = gateway_config(
        models=[{"name": "tokens", "maxBacklog": max_backlog}], tiers={"pro": {"maxRequests": 5}, "free": {}}
    )
    gateway = await gateways(config)
    redis_server.close()
    async with sdk(gateway) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="tokens", messages=ask(3))
    assert caught.value.status_code == 503
    registry = gateway.state.metrics.registry
    name = "streamqueue_gateway_rejected_total"
    assert registry.get_sample_value(name, {"tier": "pro", "reason": reason}) == 1
    assert registry.get_sample_value(name, {"tier": "pro", "reason": "backlog"}) is None


async def test_readiness_follows_redis(gateways, redis_server) -> None:
    gateway = await gateways()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.url}/readyz") as ready:
            assert ready.status == 200
        redis_server.close()
        async with http.get(f"{gateway.url}/readyz") as unready, http.get(f"{gateway.url}/healthz") as live:
            assert unready.status == 503 and live.status == 200


async def test_the_gateway_on_a_redis_cluster(gateways, gateway_config, redis_cluster, tmp_path) -> None:
    """Its own keys (quotas, ownership, watch keys) and the queue's on a 3-primary cluster: an SDK
    stream and a browser request with its event stream."""
    proc = spawn_worker(
        redis_cluster.url, "cw1", tmp_path / "cw1.log", redis_cluster="true", handler=TOKENS_HANDLER,
        tokens_interval_ms="5", block_ms="200",
    )  # fmt: skip
    try:
        config = gateway_config(
            redis={"url": redis_cluster.url, "cluster": True},
            tiers={"pro": {"maxRequests": 5, "tokensPerMinute": 100000}, "free": {}},
        )
        gateway = await gateways(config)
        async with sdk(gateway) as client:
            stream = await client.chat.completions.create(model="tokens", messages=ask(6), stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        async with aiohttp.ClientSession() as http:
            body = {"model": "tokens", "messages": ask(4)}
            async with http.post(
                f"{gateway.url}/v1/requests", json=body, headers=gateway.headers()
            ) as created:
                events = (await created.json())["events"]
            async with http.get(gateway.url + events, headers=gateway.headers()) as response:
                got = [event async for event in sse_events(response)]
    finally:
        stop_groups([(proc.pid, proc)], grace=10)
    assert text == "".join(tokens(6))
    assert (
        "".join(json.loads(e["data"]) for e in got[:-1]) == "".join(tokens(4)) and got[-1]["event"] == "done"
    )


async def test_a_fresh_gateway_on_a_redis_cluster_takes_many_requests_at_once(
    gateways, gateway_config, redis_cluster
) -> None:
    """Its first requests all at once (quota script, ownership, send): redis-py's asyncio cluster client
    failed some with AttributeError ('NoneType' ... 'writelines') unless it learnt the slot map first."""
    config = gateway_config(
        redis={"url": redis_cluster.url, "cluster": True}, tiers={"pro": {"maxRequests": 1000}, "free": {}}
    )
    gateway = await gateways(config)
    body = {"model": "tokens", "messages": ask(1)}
    async with aiohttp.ClientSession() as http:

        async def create() -> int:
            async with http.post(f"{gateway.url}/v1/requests", json=body, headers=gateway.headers()) as r:
                return r.status

        statuses = await asyncio.gather(*(create() for _ in range(200)))
    assert statuses == [202] * 200


async def test_many_quota_decisions_at_once_wait_for_a_redis_connection(gateways, gateway_config) -> None:
    """More quota scripts in flight than the gateway's Redis pool has connections (bench.gateway at 200
    streams ran into redis-py's MaxConnectionsError, answered 503): they queue for a connection."""
    gateway = await gateways(gateway_config(tiers={"pro": {"maxRequests": 1000}, "free": {}}))
    principal = Principal("alice", "pro")
    admitted = await asyncio.gather(
        *(gateway.state.quotas.admit(principal, f"r{i}") for i in range(500)), return_exceptions=True
    )
    assert [a for a in admitted if isinstance(a, BaseException)] == []
