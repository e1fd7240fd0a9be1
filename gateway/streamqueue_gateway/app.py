"""The aiohttp application: routes, probes, metrics, and how to serve it.

One port serves the API, the probes (``/healthz``: the process answers; ``/readyz``: Redis answers)
and ``/metrics``. Serve it with ``serve`` or ``make_runner``: they turn on aiohttp's
``handler_cancellation``, which cancels a route when its caller disconnects. That cancellation is how
the gateway learns of a disconnect while it waits for the model's next chunk (disconnect = cancel);
under a runner without it, a dropped caller is noticed only at the next write.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import browser, openai_api, websocket
from .config import GatewayConfig
from .core import GATEWAY, Gateway
from .errors import error_middleware

READY_TIMEOUT_S = 2.0


def make_app(config: GatewayConfig) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[browser.STREAMS] = {}

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        app[GATEWAY] = Gateway.open(config)
        await app[GATEWAY].connect()
        yield
        await app[GATEWAY].close()

    app.cleanup_ctx.append(lifetime)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", openai_api.models)
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_post("/v1/requests", browser.create)
    app.router.add_get("/v1/requests/{id}/events", browser.events)
    app.router.add_delete("/v1/requests/{id}", browser.cancel)
    app.router.add_get("/v1/ws", websocket.socket)
    return app


def make_runner(app: web.Application) -> web.AppRunner:
    """A runner that cancels a route when its caller disconnects (see the module's docstring)."""
    return web.AppRunner(app, handler_cancellation=True, access_log=None)


def serve(config: GatewayConfig, host: str, port: int) -> None:
    """Run until SIGINT/SIGTERM; in-flight requests get aiohttp's shutdown timeout to finish."""
    web.run_app(make_app(config), host=host, port=port, handler_cancellation=True, access_log=None)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await request.app[GATEWAY].redis.ping()
    except Exception as exc:
        return web.Response(status=503, text=f"redis: {exc}")
    return web.Response(text="ok")


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[GATEWAY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
