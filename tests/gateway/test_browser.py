"""A real browser on the gateway's browser endpoints: headless Chromium (Debian's) runs a small page
(browser_page.html) whose ``EventSource`` reads a streamed reply and whose ``WebSocket`` runs a chat.

Behind the gateway, everything is real: a redis-server, a worker process streaming numbered tokens
(``streamqueue_harness.token_handler``, 50 ms apart), the gateway app on a loopback port with an API
key. For the resume test the page talks to the gateway through ``DropProxy``, which cuts the event
stream's connection in the middle of an event; the browser's own EventSource reconnects with
``Last-Event-ID``, and the page must end with every token exactly once, in order, none missing: the
reply the worker wrote to Redis, read back directly.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from streamqueue import Client, wire
from streamqueue_gateway.app import make_app, make_runner
from streamqueue_gateway.config import GatewayConfig
from streamqueue_harness.browser import Chromium
from streamqueue_harness.dropproxy import DropProxy
from streamqueue_harness.redis_server import RedisServer
from streamqueue_harness.token_handler import tokens

from tests.gateway.conftest import KEYS

PAGE = Path(__file__).with_name("browser_page.html")
USER = "alice"
KEY = KEYS[USER]
TOKENS = 30  # 1.5 s of streaming at 50 ms a token: the cut comes while the worker still writes


@pytest.fixture
async def gateway(
    gateway_config: Callable[..., GatewayConfig], workers: Callable[..., object]
) -> AsyncIterator[int]:
    """The gateway app on a loopback port (returned) that also serves the test page, so the page's
    requests are same-origin, as a web app's would be; one worker streams a token every 50 ms."""
    workers(tokens_interval_ms="50")
    # The default grace: the fixture's 1 s is no longer than the browser's wait before it reconnects
    # (the gateway's ``retry: 1000``), and a resume that comes later finds its request cancelled.
    app = make_app(gateway_config(resumeGraceSeconds=10))
    app.router.add_get("/test/page.html", page)
    runner = make_runner(app)  # as the server runs it: a caller that goes away cancels its route
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(PAGE)


async def worker_reply(redis_url: str, request_id: str) -> str:
    """The whole reply as the worker wrote it, read straight from Redis (the request is not re-sent)."""
    async with Client(redis_url) as client:
        chunks = client.request_stream(USER, "", request_id=request_id, after="0-0", timeout=30)
        return "".join([chunk async for chunk in chunks])


async def start_request(browser: Chromium, content: str) -> dict[str, Any]:
    """The page POSTs a request with its bearer token, as a web app does before opening EventSource."""
    body = {"model": "tokens", "messages": [{"role": "user", "content": content}]}
    answer: dict[str, Any] = await browser.evaluate(f"postJson('/v1/requests', {json.dumps(body)}, '{KEY}')")
    assert answer["status"] == 202, answer
    return answer["body"]


async def test_event_source_resumes_after_a_dropped_connection_without_loss_or_duplicate(
    gateway: int, redis_server: RedisServer
) -> None:
    async with DropProxy(gateway, b"id: ", count=5, drops=1, lifetime=120) as proxy, Chromium() as browser:
        await browser.goto(f"http://127.0.0.1:{proxy.port}/test/page.html")
        created = await start_request(browser, f"tokens={TOKENS}")
        events_url = f"{created['events']}?access_token={KEY}"
        seen = await browser.evaluate(f"collect({json.dumps(events_url)}, 60000)")
    assert proxy.dropped == 1
    assert seen["outcome"] == "done", seen
    assert (seen["opens"], seen["drops"]) == (2, 1), "one drop, one reconnection"
    ids = [event["id"] for event in seen["events"]]
    assert ids == sorted(set(ids), key=wire.parse_entry_id), "each reply entry once, in order"
    text = "".join(event["data"] for event in seen["events"])
    assert text == "".join(tokens(TOKENS))
    assert text == await worker_reply(redis_server.url, created["id"])


async def test_websocket_chat_from_the_page(gateway: int) -> None:
    async with Chromium() as browser:
        await browser.goto(f"http://127.0.0.1:{gateway}/test/page.html")
        message = {
            "type": "chat",
            "ref": 1,
            "model": "tokens",
            "messages": [{"role": "user", "content": "tokens=5"}],
        }
        url = f"ws://127.0.0.1:{gateway}/v1/ws?access_token={KEY}"
        received = await browser.evaluate(
            f"chat({json.dumps(url)}, {json.dumps(message)}, m => ['done', 'error'].includes(m.type), 60000)"
        )
    assert [received[0]["type"], received[-1]["type"]] == ["created", "done"], received
    assert {m["id"] for m in received} == {received[0]["id"]}, "one request, one id"
    assert "".join(m["text"] for m in received if m["type"] == "chunk") == "".join(tokens(5))
