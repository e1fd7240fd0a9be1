"""``streamqueue-monitor``'s command line: parse the settings, then refresh until interrupted."""

from __future__ import annotations

import asyncio
import sys

from pydantic_settings import CliApp
from redis.exceptions import RedisError

from ..connection import connect_any
from .reads import observe
from .render import render
from .settings import MonitorSettings

_CLEAR_SCREEN = "\x1b[H\x1b[2J"


async def _run(settings: MonitorSettings) -> int:
    redis = connect_any(settings.redis_connection())
    source = settings.safe_url()
    try:
        if settings.once:
            print(render(await observe(redis, settings), source))
            return 0
        while True:
            try:
                text = render(await observe(redis, settings), source)
            except RedisError as exc:  # keep watching through a Redis restart
                text = (
                    f"streamqueue monitor  {source}\nRedis error: {exc}; retrying every {settings.interval}s"
                )
            _show(text)
            await asyncio.sleep(settings.interval)
    finally:
        await redis.aclose()


def _show(text: str) -> None:
    """Redraw in place on a terminal; append snapshots when piped, so logs stay readable."""
    prefix = _CLEAR_SCREEN if sys.stdout.isatty() else "\n"
    sys.stdout.write(prefix + text + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    settings = CliApp.run(MonitorSettings, cli_args=sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(_run(settings))
    except KeyboardInterrupt:
        return 0
    except RedisError as exc:
        print(f"streamqueue-monitor: cannot read {settings.safe_url()}: {exc}", file=sys.stderr)
        return 1
