"""``python -m streamqueue.sqtool COMMAND``: one JSON document on stdout (``{"error": ...}`` and exit
status 1 when the command cannot be done)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from ..connection import connect_any
from ..settings import WorkerSettings
from . import commands
from .args import parser


async def run(settings: WorkerSettings, args: argparse.Namespace) -> dict[str, Any]:
    """One command against the queue ``settings`` describe (also ``kubectl sq --direct``'s entry)."""
    redis = connect_any(settings.redis_connection())
    try:
        if args.command == "status":
            return await commands.status(redis, settings)
        return await commands.dlq(redis, settings, args)
    finally:
        await redis.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = asyncio.run(run(WorkerSettings(), args))
    except (RedisError, LookupError, ValueError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
