"""The aiohttp application: routes, probes, metrics, and how to serve it.

One port serves the API, the probes (``/healthz``: the process answers; ``/readyz``: Redis answers and
the gateway is not stopping) and ``/metrics``. Serve it with ``serve`` or ``make_runner``: they turn on
aiohttp's ``handler_cancellation``, which cancels a route when its caller disconnects. That
cancellation is how the gateway learns of a disconnect while it waits for the model's next chunk
(disconnect = cancel); under a runner without it, a dropped caller is noticed only at the next write.

Stopping (``serve``, on SIGTERM or SIGINT): ``/readyz`` answers 503 at once while requests are still
taken for ``shutdownDelaySeconds``, the time load balancers and the Service's endpoints need to stop
sending new ones (in place of a preStop sleep); then the port closes, the requests in flight (open
streams included) get ``shutdownTimeoutSeconds`` to finish, and those still open end as a disconnect
ends them (an OpenAI stream's request is cancelled; a browser's event stream can resume on another
replica within the grace). The process exits within ``shutdown_bound_seconds`` of the signal, which
the chart keeps below the pod's ``terminationGracePeriodSeconds``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from streamqueue import aio

from . import browser, openai_api, websocket
from .config import SHUTDOWN_MARGIN_S, GatewayConfig
from .core import GATEWAY, Gateway
from .errors import error_middleware

log = logging.getLogger(__name__)

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


def make_runner(app: web.Application, *, shutdown_timeout_s: float = 60.0) -> web.AppRunner:
    """A runner that cancels a route when its caller disconnects (see the module's docstring);
    ``cleanup`` waits up to ``shutdown_timeout_s`` for the requests in flight."""
    return web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout_s)


def serve(config: GatewayConfig, host: str, port: int) -> None:
    """Run until SIGTERM or SIGINT, then stop as the module's docstring says (on uvloop if installed)."""
    aio.run(_serve(config, host, port))


async def _serve(config: GatewayConfig, host: str, port: int) -> None:
    app = make_app(config)
    runner = make_runner(app, shutdown_timeout_s=config.shutdown_timeout_seconds)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("serving on %s:%d", host, port)
        await _signalled()
        app[GATEWAY].stopping = True
        log.info("stopping: not ready, still serving for %g s", config.shutdown_delay_seconds)
        await asyncio.sleep(config.shutdown_delay_seconds)  # the endpoints' update: a duration, not a sync
        log.info("stopping: port closed, %g s for the requests in flight", config.shutdown_timeout_seconds)
    finally:
        try:  # aiohttp waits up to the timeout, then cancels and may wait that long again: bound it
            async with asyncio.timeout(config.shutdown_timeout_seconds + SHUTDOWN_MARGIN_S):
                await runner.cleanup()
        except TimeoutError:
            log.warning("stopped before every request in flight had ended")


async def _signalled() -> None:
    """Return at the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    if gateway.stopping:
        return web.Response(status=503, text="stopping")
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await gateway.redis.ping()
    except Exception as exc:
        return web.Response(status=503, text=f"redis: {exc}")
    return web.Response(text="ok")


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[GATEWAY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
