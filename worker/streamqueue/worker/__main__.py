"""``streamqueue-worker`` / ``python -m streamqueue.worker``: one worker process for a pod.

Configuration comes from flags and ``STREAMQUEUE_*`` variables (see ``--help``). SIGTERM or SIGINT
starts the drain; the process exits 0 once in-flight work is finished or handed back, 2 on invalid
settings, 1 if the worker failed. The process runs on uvloop's event loop when uvloop is installed
(``pip install 'streamqueue[uvloop]'``), else on asyncio's own.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from pydantic import ValidationError
from pydantic_settings import CliApp

from .. import aio
from ..handlers import HandlerLoadError
from ..health import start_health_server
from ..settings import WorkerSettings
from . import logs
from .worker import Worker

log = logging.getLogger("streamqueue.worker")


async def serve(settings: WorkerSettings) -> None:
    """Run a Worker with its health server until SIGTERM/SIGINT, then drain."""
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, worker, sig)
    health = None
    if settings.health_port:
        health = await start_health_server(
            lambda: worker.ready, worker.metrics.registry, settings.health_host, settings.health_port
        )
    try:
        await worker.run()
    finally:
        if health is not None:
            await health.cleanup()


def _on_signal(worker: Worker, sig: signal.Signals) -> None:
    log.info("received %s: draining", sig.name)
    worker.request_stop()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = CliApp.run(WorkerSettings, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        print(f"streamqueue-worker: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.consumer)
    try:
        aio.run(serve(settings))
    except (HandlerLoadError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    except Exception:
        log.exception("worker failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
