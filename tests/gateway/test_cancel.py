"""Disconnect = cancel: a caller that goes away mid-request has its request cancelled on the queue, so
the worker's model call stops and the quota slot is freed; a browser's event stream gets
``resumeGraceSeconds`` to come back first. Real redis-server, worker processes, and (for "the model
call stops") the model handler in front of a chat-completions stub that notices its caller leaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp
import openai
from aiohttp import web
from streamqueue import wire
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.modelserver import completion_chunk

from tests.gateway.conftest import (
    KEYS,
    MODEL_HANDLER,
    RunningGateway,
    final_entry,
    reply_entries,
    sse_events,
    warmed_up,
)

LONG = {"model": "tokens", "messages": [{"role": "user", "content": "tokens=400"}]}


class EndlessModel:
    """A model server that streams a word every 20 ms until its caller (the worker) goes away."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def respond(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(3000):
                await response.write(completion_chunk(f"w{i} "))
                await asyncio.sleep(0.02)  # the model's pace, not a synchronisation
        except ConnectionError:
            self.gone.set()
            raise
        return response


async def cancelled(redis_server, user: str, request_id: str) -> dict[str, str]:
    final = await eventually_async(lambda: final_entry(redis_server, user, request_id), "the final entry")
    assert final.get(wire.CANCELLED) == wire.CANCELLED_YES, final
    return final


async def test_a_dropped_openai_stream_stops_the_model_call_and_frees_the_slot(
    gateways, gateway_config, workers, stub, redis_server
) -> None:
    model = EndlessModel()
    server = await stub(model.respond)
    workers(handler=MODEL_HANDLER, openai_base_url=server.base_url)
    gateway = await gateways(gateway_config(tiers={"pro": {}, "free": {"maxRequests": 1}}))
    messages = [{"role": "user", "content": "go on"}]
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEYS["bob"], max_retries=0) as client:
        stream = await client.chat.completions.create(model="tokens", messages=messages, stream=True)
        first = await anext(aiter(stream))
        await stream.close()  # the caller goes away
        await asyncio.wait_for(model.gone.wait(), 30)  # the worker's model call stopped
        await cancelled(redis_server, "bob", first.id.removeprefix("chatcmpl-"))
        model.gone.clear()

        async def admitted() -> bool:  # the one slot is free again
            try:
                await (
                    await client.chat.completions.create(model="tokens", messages=messages, stream=True)
                ).close()
            except openai.RateLimitError:
                return False
            return True

        await eventually_async(admitted, "bob's slot freed")


async def test_a_caller_leaving_a_non_streamed_completion_cancels_it(gateways, workers, redis_server) -> None:
    workers(tokens_interval_ms="20")
    gateway = await gateways()
    async with aiohttp.ClientSession() as http:
        url, headers = f"{gateway.url}/v1/chat/completions", gateway.headers()
        waiting = asyncio.create_task(http.post(url, json=LONG, headers=headers))
        r = redis_server.client(decode_responses=True)
        key = wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, "alice")
        [(_, chunk)] = await eventually_async(lambda: r.xrange(key, count=1), "the reply under way")
        waiting.cancel()  # the HTTP client gives up: its connection closes
        await asyncio.gather(waiting, return_exceptions=True)
    await cancelled(redis_server, "alice", chunk[wire.REQUEST_ID])
    await eventually_async(lambda: _requests_counted(gateway, "disconnected") == 1, "counted as disconnected")


def _requests_counted(gateway: RunningGateway, outcome: str) -> float:
    """streamqueue_gateway_requests_total with ``outcome``, over every model and tier."""
    return sum(
        sample.value
        for metric in gateway.state.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == "streamqueue_gateway_requests_total" and sample.labels.get("outcome") == outcome
    )


@contextlib.asynccontextmanager
async def websocket_chat(
    gateway: RunningGateway,
) -> AsyncIterator[tuple[aiohttp.ClientWebSocketResponse, str]]:
    """A WebSocket with one long chat running on it: the socket and the request's id."""
    url = f"{gateway.url}/v1/ws"
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=gateway.headers()) as ws:
        await ws.send_json({"type": "chat", **LONG})
        created = await ws.receive_json(timeout=30)
        yield ws, created["id"]


async def test_closing_the_websocket_cancels_its_requests(gateways, workers, redis_server) -> None:
    workers(tokens_interval_ms="20")
    async with websocket_chat(await gateways()) as (ws, request_id):
        assert (await ws.receive_json(timeout=30))["type"] == "chunk"
    await cancelled(redis_server, "alice", request_id)


async def test_an_event_stream_not_resumed_within_the_grace_is_cancelled(
    gateways, workers, redis_server
) -> None:
    workers(tokens_interval_ms="20")
    gateway = await gateways()  # resumeGraceSeconds: 1
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway.url}/v1/requests", json=LONG, headers=gateway.headers()) as response:
            created = await response.json()
        async with http.get(gateway.url + created["events"], headers=gateway.headers()) as response:
            await anext(sse_events(response))
    await cancelled(redis_server, "alice", created["id"])
    chunks = [f for f in reply_entries(redis_server, "alice", created["id"]) if wire.CHUNK in f]
    assert len("".join(f[wire.CHUNK] for f in chunks)) < len("t0 ") * 400  # stopped early


async def test_a_request_nobody_watches_is_cancelled_after_the_grace(gateways, workers, redis_server) -> None:
    workers(tokens_interval_ms="20")
    gateway = await gateways()
    url = f"{gateway.url}/v1/requests"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=LONG, headers=gateway.headers()) as response,
    ):
        created = await response.json()
    await cancelled(redis_server, "alice", created["id"])


async def test_no_next_chunk_in_time_cancels_and_reports_an_error(
    gateways, gateway_config, workers, redis_server
) -> None:
    workers(tokens_interval_ms="5000")  # a first token, then a long silence
    gateway = await gateways(gateway_config(requestTimeoutSeconds=0.5))
    await warmed_up(redis_server)  # the first token comes within the timeout
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key=KEYS["alice"], max_retries=0
    ) as client:
        stream = await client.chat.completions.create(model="tokens", messages=LONG["messages"], stream=True)
        first = await anext(aiter(stream))
        try:
            async for _ in stream:
                pass
            raise AssertionError("the stream ended without an error")
        except openai.APIError as exc:
            assert json.dumps(exc.body).find("timeout") != -1
    await cancelled(redis_server, "alice", first.id.removeprefix("chatcmpl-"))


async def test_a_websocket_cancel_stops_that_request(gateways, workers, redis_server) -> None:
    workers(tokens_interval_ms="20")
    async with websocket_chat(await gateways()) as (ws, request_id):
        await ws.send_json({"type": "cancel", "id": request_id})
        frames = [await ws.receive_json(timeout=30)]
        while frames[-1]["type"] == "chunk":
            frames.append(await ws.receive_json(timeout=30))
    assert frames[-1]["type"] == "error" and frames[-1]["id"] == request_id
    assert frames[-1]["error"]["code"] == "cancelled"
    await cancelled(redis_server, "alice", request_id)


async def test_resuming_on_another_replica_within_the_grace_keeps_the_request(
    gateways, workers, redis_server
) -> None:
    """The stream drops on one replica and resumes on another within the grace; the reply (3 s, well
    past the 1 s grace) then streams to its end: the first replica's grace timer saw the new watcher."""
    workers(tokens_interval_ms="20")
    first, second = await gateways(), await gateways()
    body = {**LONG, "messages": [{"role": "user", "content": "tokens=150"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{first.url}/v1/requests", json=body, headers=first.headers()) as response:
            created = await response.json()
        async with http.get(first.url + created["events"], headers=first.headers()) as response:
            last = await anext(sse_events(response))
        headers = {**second.headers(), "Last-Event-ID": last["id"]}
        async with http.get(second.url + created["events"], headers=headers) as response:
            rest = [event async for event in sse_events(response)]
    assert rest[-1]["event"] == "done"
    final = final_entry(redis_server, "alice", created["id"])
    assert final is not None and wire.CANCELLED not in final
