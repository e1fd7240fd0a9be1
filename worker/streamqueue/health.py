"""The pod's probe and scrape endpoints: ``/healthz``, ``/readyz`` and ``/metrics``.

``/healthz`` answers while the event loop runs (a wedged loop fails the liveness probe);
``/readyz`` only while the worker consumes (group present, Redis answering, not draining), so a
draining or disconnected pod drops out of readiness without being restarted.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def health_app(is_ready: Callable[[], bool], registry: CollectorRegistry) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if is_ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def start_health_server(
    is_ready: Callable[[], bool], registry: CollectorRegistry, host: str, port: int
) -> web.AppRunner:
    """Serve the endpoints on ``host:port``; the caller ``await runner.cleanup()`` at exit."""
    runner = web.AppRunner(health_app(is_ready, registry), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
