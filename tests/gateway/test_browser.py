"""A real browser on the gateway's browser endpoints: headless Chromium (Debian's) runs a web app's
script (browser_page.js) whose ``EventSource`` reads a streamed reply and whose ``WebSocket`` runs a chat.

The gateway serves no pages, so the script runs in a document of the gateway's own origin (its
``/healthz``), where a web app served beside the API would run: same-origin fetch, EventSource and
WebSocket, no CORS. Behind the gateway everything is real: a redis-server, a worker process streaming
numbered tokens (``streamqueue_harness.token_handler``, 50 ms apart), the gateway app with API keys.
For the resume test the browser talks to the gateway through ``DropProxy``, which cuts the event
stream's connection in the middle of an event; the browser's own EventSource reconnects with
``Last-Event-ID``, and the page must end with every token exactly once, in order, none missing: the
reply the worker wrote to Redis, read back directly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from streamqueue import Client, wire
from streamqueue_harness.browser import Chromium
from streamqueue_harness.dropproxy import DropProxy
from streamqueue_harness.redis_server import RedisServer
from streamqueue_harness.token_handler import tokens

from tests.gateway.conftest import KEYS, RunningGateway

SCRIPT = Path(__file__).with_name("browser_page.js").read_text()
USER = "alice"
KEY = KEYS[USER]
TOKENS = 30  # 1.5 s of streaming at 50 ms a token: the cut comes while the worker still writes


@pytest.fixture
async def gateway(
    gateways: Callable[..., Any], gateway_config: Callable[..., Any], workers: Callable[..., object]
) -> RunningGateway:
    """A gateway and one worker streaming a token every 50 ms, with the default resume grace and
    browser retry (10 s, ``retry: 1000``), as deployed."""
    workers(tokens_interval_ms="50")
    running: RunningGateway = await gateways(gateway_config(resumeGraceSeconds=10, sseRetrySeconds=1))
    return running


async def open_app(browser: Chromium, base_url: str) -> None:
    """Load a document of the gateway's origin and run the web app's script in it."""
    await browser.goto(f"{base_url}/healthz")
    await browser.evaluate(SCRIPT)


async def worker_reply(redis_url: str, request_id: str) -> str:
    """The whole reply as the worker wrote it, read straight from Redis (the request is not re-sent)."""
    async with Client(redis_url) as client:
        chunks = client.request_stream(USER, "", request_id=request_id, after="0-0", timeout=30)
        return "".join([chunk async for chunk in chunks])


async def start_request(browser: Chromium, key: str, model: str, content: str) -> dict[str, Any]:
    """The page POSTs a request with its bearer token, as a web app does before opening EventSource."""
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    answer: dict[str, Any] = await browser.evaluate(f"postJson('/v1/requests', {json.dumps(body)}, '{key}')")
    assert answer["status"] == 202, answer
    return answer["body"]


async def read_events(browser: Chromium, events: str, key: str) -> dict[str, Any]:
    """The page follows a request's events with EventSource until ``done``: what it saw and how."""
    url = f"{events}?access_token={key}"
    seen: dict[str, Any] = await browser.evaluate(f"collect({json.dumps(url)}, 120000)")
    return seen


async def test_event_source_resumes_after_a_dropped_connection_without_loss_or_duplicate(
    gateway: RunningGateway, redis_server: RedisServer
) -> None:
    port = urlsplit(gateway.url).port
    assert port is not None
    async with DropProxy(port, b"id: ", count=5, drops=1, lifetime=120) as proxy, Chromium() as browser:
        await open_app(browser, f"http://127.0.0.1:{proxy.port}")
        created = await start_request(browser, KEY, "tokens", f"tokens={TOKENS}")
        seen = await read_events(browser, created["events"], KEY)
    assert proxy.dropped == 1
    assert seen["outcome"] == "done", seen
    assert (seen["opens"], seen["drops"]) == (2, 1), "one drop, one reconnection"
    ids = [event["id"] for event in seen["events"]]
    assert ids == sorted(set(ids), key=wire.parse_entry_id), "each reply entry once, in order"
    text = "".join(event["data"] for event in seen["events"])
    assert text == "".join(tokens(TOKENS))
    assert text == await worker_reply(redis_server.url, created["id"])


async def test_websocket_chat_from_the_page(gateway: RunningGateway) -> None:
    async with Chromium() as browser:
        await open_app(browser, gateway.url)
        message = {
            "type": "chat",
            "ref": 1,
            "model": "tokens",
            "messages": [{"role": "user", "content": "tokens=5"}],
        }
        url = f"{gateway.url.replace('http', 'ws', 1)}/v1/ws?access_token={KEY}"
        received = await browser.evaluate(
            f"chat({json.dumps(url)}, {json.dumps(message)}, m => ['done', 'error'].includes(m.type), 60000)"
        )
    assert [received[0]["type"], received[-1]["type"]] == ["created", "done"], received
    assert {m["id"] for m in received} == {received[0]["id"]}, "one request, one id"
    assert "".join(m["text"] for m in received if m["type"] == "chunk") == "".join(tokens(5))
