"""Helpers shared by the data-plane benchmarks: loading a queue, waiting for it to drain, printing."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import redis.asyncio as aioredis
from streamqueue import wire
from streamqueue_harness.eventually import eventually_async

# This checkout: its bench and harness run even when another worktree's streamqueue is measured.
THIS_TREE = Path(__file__).resolve().parents[1]

LOAD_BATCH = 1000


async def load_requests(redis: aioredis.Redis, stream: str, count: int, users: int) -> None:
    """XADD ``count`` article-format requests spread over ``users`` users, pipelined in batches."""
    for start in range(0, count, LOAD_BATCH):
        pipe = redis.pipeline(transaction=False)
        for i in range(start, min(start + LOAD_BATCH, count)):
            pipe.xadd(
                stream,
                {
                    wire.USER_ID: f"user{i % users}",
                    wire.MESSAGE: f"message {i}",
                    wire.TIMESTAMP: repr(time.time()),
                },
            )
        await pipe.execute()


async def wait_drained(
    redis: aioredis.Redis, stream: str, group: str, poll_s: float = 0.005, limit_s: float = 3600
) -> float:
    """Wait until the group has delivered and acknowledged everything; returns the perf_counter time seen.

    Both contenders are timed by this same poll, so its granularity is the same small error for each.
    """

    async def drained_at() -> float | None:
        groups = [wire.GroupInfo.from_reply(g) for g in await redis.xinfo_groups(stream)]
        info = next(g for g in groups if g.name == group)
        return time.perf_counter() if info.pending == 0 and info.lag == 0 else None

    return await eventually_async(drained_at, f"{group} on {stream} drained", limit_s, poll_s, TimeoutError)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; NaN for no values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` so far (``/proc/<pid>/stat``, Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(headers), *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print(
            "  ".join(
                v.rjust(w) if n and i else v.ljust(w)
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def tree_env(tree: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment with ``tree``'s streamqueue first on the path (bench and harness stay this
    tree's), for a process that measures another worktree's code; ``extra`` added on top."""
    paths = [str(tree / "worker"), str(THIS_TREE), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **(extra or {})}
