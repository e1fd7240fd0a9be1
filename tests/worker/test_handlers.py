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
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.ports import free_port

from tests.worker.conftest import Attempts, group_settled, replies, send

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


@pytest.fixture
async def http_handler() -> AsyncIterator[Callable[..., HttpHandler]]:
    """Build HttpHandlers for a test; their sessions are closed at teardown."""
    built: list[HttpHandler] = []

    def build(url: str, *, timeout_s: float = 5, retries: int = 0) -> HttpHandler:
        built.append(HttpHandler(url, timeout_s=timeout_s, retries=retries))
        return built[-1]

    yield build
    for handler in built:
        await close_handler(handler)


async def test_http_handler_posts_the_message_and_replies_with_the_body(service, http_handler) -> None:
    received = []

    async def respond(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="model says hello")

    handler = http_handler(await service(respond), timeout_s=5, retries=0)
    assert await handler(MSG) == "model says hello"
    assert received == [
        {"id": "1-0", "user_id": "alice", "message": "hi", "request_id": "r1", "deliveries": 2, "fields": {}}
    ]


async def test_http_handler_retries_server_errors_then_succeeds(service, http_handler) -> None:
    @Attempts
    async def respond(request: web.Request, attempt: int) -> web.Response:
        return web.Response(status=503) if attempt < 3 else web.Response(text="third time")

    handler = http_handler(await service(respond.handler), timeout_s=5, retries=2)
    assert await handler(MSG) == "third time"
    assert respond.calls == 3


async def test_http_handler_does_not_retry_client_errors(service, http_handler) -> None:
    @Attempts
    async def respond(request: web.Request, attempt: int) -> web.Response:
        return web.Response(status=422, text="bad prompt")

    handler = http_handler(await service(respond.handler), timeout_s=5, retries=3)
    with pytest.raises(HttpHandlerError, match="422: bad prompt"):
        await handler(MSG)
    assert respond.calls == 1


async def test_http_handler_times_out_and_gives_up(service, http_handler) -> None:
    async def respond(request: web.Request) -> web.Response:
        await asyncio.sleep(1)
        return web.Response(text="too late")

    handler = http_handler(await service(respond), timeout_s=0.2, retries=1)
    with pytest.raises(HttpHandlerError, match="after 2 attempts"):
        await handler(MSG)


async def test_http_handler_unreachable_service_fails(http_handler) -> None:
    handler = http_handler(f"http://127.0.0.1:{free_port()}/", timeout_s=1, retries=0)
    with pytest.raises(HttpHandlerError, match="ClientConnectorError"):
        await handler(MSG)


async def test_worker_with_handler_url_answers_from_the_service(raw, settings, workers, service) -> None:
    async def respond(request: web.Request) -> web.Response:
        body = await request.json()
        return web.Response(text=f"{body['user_id']} asked {body['message']}")

    await workers.start(settings(handler_url=await service(respond)))
    send(raw, "judy", "what time is it", request_id="j1")
    await eventually_async(lambda: group_settled(raw), "the HTTP-backed reply", timeout=15)
    [reply] = replies(raw, "judy")
    assert (reply[wire.RESPONSE], reply[wire.REQUEST_ID]) == ("judy asked what time is it", "j1")
