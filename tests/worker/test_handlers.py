"""Handler loading by name, and the HTTP handler against a real local aiohttp server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from streamqueue import wire
from streamqueue.handlers import HandlerLoadError, Message, close_handler, load_handler
from streamqueue.handlers.echo import handle as echo
from streamqueue.handlers.http import HttpHandler, HttpHandlerError
from streamqueue.settings import WorkerSettings
from streamqueue_harness.ports import free_port

from tests.worker.conftest import async_wait_for, group_settled, replies, send

MSG = Message(id="1-0", stream="s", user_id="alice", message="hi", request_id="r1", deliveries=2)


async def test_echo_replies_like_the_article() -> None:
    assert await echo(MSG) == "Echo: hi"


def test_loader_finds_functions_and_builds_factories() -> None:
    settings = WorkerSettings(handler_url="http://127.0.0.1:1/")
    assert load_handler("streamqueue.handlers.echo:handle", settings) is echo
    built = load_handler("streamqueue.handlers.http:handle", settings)
    assert isinstance(built, HttpHandler) and built.url == "http://127.0.0.1:1/"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("streamqueue.handlers.echo", "module:function"),
        ("no_such_module_xyz:handle", "cannot import"),
        ("streamqueue.handlers.echo:nope", "no attribute"),
        ("streamqueue.wire:DEFAULT_STREAM", "not callable"),
    ],
)
def test_loader_explains_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(HandlerLoadError, match=message):
        load_handler(spec, WorkerSettings())


def test_http_handler_needs_a_url() -> None:
    with pytest.raises(ValueError, match="HANDLER_URL"):
        load_handler("streamqueue.handlers.http:handle", WorkerSettings())


@pytest.fixture
async def service() -> AsyncIterator[Callable[..., str]]:
    """A real HTTP server on loopback; ``start(handler)`` returns its URL."""
    runners: list[web.AppRunner] = []

    async def start(respond) -> str:
        app = web.Application()
        app.router.add_post("/", respond)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}/"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_http_handler_posts_the_message_and_replies_with_the_body(service) -> None:
    received = []

    async def respond(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="model says hello")

    handler = HttpHandler(await service(respond), timeout_s=5, retries=0)
    try:
        assert await handler(MSG) == "model says hello"
    finally:
        await handler.aclose()
    assert received == [
        {"id": "1-0", "user_id": "alice", "message": "hi", "request_id": "r1", "deliveries": 2, "fields": {}}
    ]


async def test_http_handler_retries_server_errors_then_succeeds(service) -> None:
    attempts = 0

    async def respond(request: web.Request) -> web.Response:
        nonlocal attempts
        attempts += 1
        return web.Response(status=503) if attempts < 3 else web.Response(text="third time")

    handler = HttpHandler(await service(respond), timeout_s=5, retries=2)
    try:
        assert await handler(MSG) == "third time"
    finally:
        await handler.aclose()
    assert attempts == 3


async def test_http_handler_does_not_retry_client_errors(service) -> None:
    attempts = 0

    async def respond(request: web.Request) -> web.Response:
        nonlocal attempts
        attempts += 1
        return web.Response(status=422, text="bad prompt")

    handler = HttpHandler(await service(respond), timeout_s=5, retries=3)
    try:
        with pytest.raises(HttpHandlerError, match="422: bad prompt"):
            await handler(MSG)
    finally:
        await handler.aclose()
    assert attempts == 1


async def test_http_handler_times_out_and_gives_up(service) -> None:
    async def respond(request: web.Request) -> web.Response:
        await asyncio.sleep(1)
        return web.Response(text="too late")

    handler = HttpHandler(await service(respond), timeout_s=0.2, retries=1)
    try:
        with pytest.raises(HttpHandlerError, match="after 2 attempts"):
            await handler(MSG)
    finally:
        await handler.aclose()


async def test_http_handler_unreachable_service_fails() -> None:
    handler = HttpHandler(f"http://127.0.0.1:{free_port()}/", timeout_s=1, retries=0)
    try:
        with pytest.raises(HttpHandlerError, match="ClientConnectorError"):
            await handler(MSG)
    finally:
        await close_handler(handler)


async def test_worker_with_handler_url_answers_from_the_service(raw, settings, workers, service) -> None:
    async def respond(request: web.Request) -> web.Response:
        body = await request.json()
        return web.Response(text=f"{body['user_id']} asked {body['message']}")

    await workers.start(settings(handler_url=await service(respond)))
    send(raw, "judy", "what time is it", request_id="j1")
    await async_wait_for(lambda: group_settled(raw), what="the HTTP-backed reply")
    [reply] = replies(raw, "judy")
    assert (reply[wire.RESPONSE], reply[wire.REQUEST_ID]) == ("judy asked what time is it", "j1")
