"""The browser endpoints with an HTTP client (aiohttp; the real browser is test_browser.py): create a
request, follow it as server-sent events, resume after a dropped connection with ``Last-Event-ID`` on
the same or another replica, cancel it, run chats over the WebSocket; and a request id is its user's
alone. A real redis-server and a worker process streaming numbered tokens."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from streamqueue import wire
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.token_handler import tokens

from tests.gateway.conftest import KEYS, RunningGateway, final_entry, reply_entries, sse_events

CHAT = {"model": "tokens", "messages": [{"role": "user", "content": "tokens=30"}]}


async def create(http: aiohttp.ClientSession, gateway: RunningGateway, user: str = "alice") -> dict[str, Any]:
    async with http.post(f"{gateway.url}/v1/requests", json=CHAT, headers=gateway.headers(user)) as created:
        assert created.status == 202, await created.text()
        return dict(await created.json())


def text_of(events: list[dict[str, str]]) -> str:
    return "".join(json.loads(e["data"]) for e in events if "event" not in e)


@pytest.mark.parametrize("replicas", [1, 2], ids=["same-replica", "other-replica"])
async def test_a_dropped_event_stream_resumes_with_last_event_id(
    gateways, workers, redis_server, replicas: int
) -> None:
    """Three chunks, the connection drops, chunks are written while nobody listens, the browser
    reconnects (to another replica in the second case) with Last-Event-ID: every chunk once, in order,
    and the request is not cancelled (resumed within the grace)."""
    workers(tokens_interval_ms="30")
    first = await gateways()
    second = await gateways() if replicas == 2 else first
    async with aiohttp.ClientSession() as http:
        created = await create(http, first)
        got: list[dict[str, str]] = []
        async with http.get(first.url + created["events"], headers=first.headers()) as response:
            async for event in sse_events(response):
                got.append(event)
                if len(got) == 3:
                    break  # leaving the block drops the connection mid-stream
        written = len(reply_entries(redis_server, "alice", created["id"]))
        await eventually_async(
            lambda: len(reply_entries(redis_server, "alice", created["id"])) > written,
            "chunks written meanwhile",
        )
        headers = {**second.headers(), "Last-Event-ID": got[-1]["id"]}
        async with http.get(second.url + created["events"], headers=headers) as response:
            got += [event async for event in sse_events(response)]
    chunks, done = got[:-1], got[-1]
    assert text_of(chunks) == "".join(tokens(30))
    assert len({e["id"] for e in chunks}) == len(chunks)
    assert done["event"] == "done" and "id" not in done
    final = final_entry(redis_server, "alice", created["id"])
    assert final is not None and wire.CANCELLED not in final


async def test_the_access_token_parameter_stands_in_for_the_header(gateways, workers) -> None:
    """EventSource cannot send headers: ``?access_token=`` works on the browser endpoints."""
    workers()
    gateway = await gateways()
    token = f"access_token={KEYS['alice']}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway.url}/v1/requests?{token}", json=CHAT) as created:
            assert created.status == 202
            events = (await created.json())["events"]
        async with http.get(f"{gateway.url}{events}?{token}") as response:
            got = [event async for event in sse_events(response)]
        async with http.get(f"{gateway.url}{events}") as response:
            assert response.status == 401
    assert text_of(got) == "".join(tokens(30)) and got[-1]["event"] == "done"


async def test_another_users_request_id_is_the_same_404_as_an_unknown_one(gateways) -> None:
    gateway = await gateways()
    async with aiohttp.ClientSession() as http:
        created = await create(http, gateway, "alice")
        answers = []
        for request_id in (created["id"], "0" * 32, "not-an-id"):
            for method, path in (("GET", "/events"), ("DELETE", "")):
                url = f"{gateway.url}/v1/requests/{request_id}{path}"
                async with http.request(method, url, headers=gateway.headers("bob")) as response:
                    answers.append((response.status, await response.json()))
    assert {status for status, _ in answers} == {404}
    assert len({json.dumps(body) for _, body in answers}) == 1  # nothing tells them apart
    async with aiohttp.ClientSession() as http:
        headers = {**gateway.headers("alice"), "Last-Event-ID": "not-an-id"}
        async with http.get(gateway.url + created["events"], headers=headers) as response:
            assert response.status == 400


async def test_delete_cancels_the_request_and_its_stream_ends_with_an_error(
    gateways, workers, redis_server
) -> None:
    workers(tokens_interval_ms="50")
    gateway = await gateways()
    async with aiohttp.ClientSession() as http:
        created = await create(http, gateway)
        async with http.get(gateway.url + created["events"], headers=gateway.headers()) as response:
            events = sse_events(response)
            await anext(events)
            url = f"{gateway.url}/v1/requests/{created['id']}"
            async with http.delete(url, headers=gateway.headers()) as deleted:
                assert deleted.status == 204
            rest = [event async for event in events]
    assert rest[-1]["event"] == "error"
    # The same error object as the OpenAI and WebSocket routes give.
    assert json.loads(rest[-1]["data"]) == {
        "message": "the request was cancelled",
        "type": "invalid_request_error",
        "param": None,
        "code": "cancelled",
    }
    final = final_entry(redis_server, "alice", created["id"])
    assert final is not None and final[wire.CANCELLED] == wire.CANCELLED_YES


async def test_chats_over_the_websocket(gateways, workers) -> None:
    workers()
    gateway = await gateways()
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{gateway.url}/v1/ws", headers=gateway.headers()) as ws,
    ):
        await ws.send_json({"type": "chat", "ref": "a", **CHAT})
        await ws.send_json({"type": "chat", "ref": "b", "model": "nope", "messages": CHAT["messages"]})
        frames = []
        while not frames or frames[-1]["type"] not in ("done", "error") or len(frames) < 3:
            frames.append(await ws.receive_json(timeout=30))
    by_type: dict[str, list[dict[str, Any]]] = {}
    for frame in frames:
        by_type.setdefault(frame["type"], []).append(frame)
    [created] = by_type["created"]
    [refused] = [f for f in by_type.get("error", []) if f.get("ref") == "b"]
    assert created["ref"] == "a" and refused["error"]["code"] == "model_not_found"
    assert "".join(f["text"] for f in by_type["chunk"]) == "".join(tokens(30))
    assert by_type["done"][0]["id"] == created["id"] and by_type["done"][0]["usage"]["total_tokens"] > 0


async def test_a_reply_that_is_not_streamed_arrives_whole(gateways, workers) -> None:
    """A handler that only returns its answer (no chunks): the event stream gives it as one chunk, also
    when the user's reply stream already holds earlier replies (the stream starts behind them)."""
    workers(handler="streamqueue.handlers.echo:handle")
    gateway = await gateways()
    texts = []
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            created = await create(http, gateway)
            async with http.get(gateway.url + created["events"], headers=gateway.headers()) as response:
                texts.append(text_of([event async for event in sse_events(response)]))
    assert texts == ["Echo: tokens=30"] * 2
