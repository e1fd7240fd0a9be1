"""Fairness: how long one user's single message waits while another user's burst of 1,000 is served.

Two worker processes (``python -m streamqueue.worker``, 10 slots each, the demo handler taking 20 ms
per message) serve one queue. User ``heavy`` sends 1,000 messages at once; while they are being
handled, 20 light users send one message each, 50 ms apart, through ``streamqueue.Client``. Each light
message's latency (sent -> final reply at the client) is measured with ``fairness=none`` (arrival
order: it waits for what is left of the burst) and ``fairness=perUser`` (it waits for at most one
entry of each waiting user: ``2 * 2 - 1`` dispatches here, well under one handler time with 20 slots).
The burst's own drain time shows what fairness costs in throughput (the intake and dispatch scripts).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
from streamqueue import Client, wire
from streamqueue_harness.processes import stop_groups
from streamqueue_harness.redis_server import RedisServer
from streamqueue_harness.workerproc import spawn_worker

from bench.common import load_requests, percentile, print_table, wait_drained

HANDLER_MS = 20
SLOTS_PER_WORKER = 10
WORKERS = 2


async def _light_users(client: Client, users: int, spacing_s: float) -> list[float]:
    """Each light user sends one request, ``spacing_s`` after the previous one; latencies in ms."""

    async def one(n: int) -> float:
        await asyncio.sleep(n * spacing_s)
        start = time.perf_counter()
        await client.request(f"light{n}", "hello", timeout=120)
        return (time.perf_counter() - start) * 1000

    return list(await asyncio.gather(*(one(n) for n in range(users))))


async def _round(url: str, burst: int, light: int) -> tuple[list[float], float]:
    """One burst with light users interleaved; their latencies and the burst's drain time (s)."""
    redis = aioredis.Redis.from_url(url, decode_responses=True)
    async with Client(url) as client:
        await client.request("warmup", "hi", timeout=60)  # both workers up, group created
        start = time.perf_counter()
        await load_requests(redis, wire.DEFAULT_STREAM, burst, users=1)  # all from "user0": the heavy one
        latencies = await _light_users(client, light, spacing_s=0.05)
        drained = await wait_drained(redis, wire.DEFAULT_STREAM, wire.DEFAULT_GROUP)
    await redis.aclose()
    return latencies, drained - start


def _measure(fairness: str, burst: int, light: int, workdir: Path) -> tuple[list[float], float]:
    """Light users' waits (ms) and the burst's throughput (msgs/s) with ``fairness`` on the workers."""
    with RedisServer() as redis:
        settings = {
            "handler": "streamqueue_harness.demo_handler:handle",
            "demo_delay_ms": str(HANDLER_MS),
            "concurrency": str(SLOTS_PER_WORKER),
            "fairness": fairness,
        }
        workers = [
            spawn_worker(redis.url, f"w{n}", workdir / f"{fairness}-w{n}.log", **settings)
            for n in range(WORKERS)
        ]
        try:
            latencies, drain_s = asyncio.run(_round(redis.url, burst, light))
        finally:
            stop_groups([(w.pid, w) for w in workers], grace=10)
    return latencies, burst / drain_s


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=1000, help="messages the heavy user sends at once")
    parser.add_argument("--light", type=int, default=20, help="light users, one message each")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="sq-bench-fairness-"))
    results = {
        fairness: _measure(fairness, args.burst, args.light, workdir) for fairness in ("none", "perUser")
    }
    rows = [
        [fairness, len(waits), percentile(waits, 0.5), max(waits), rate]
        for fairness, (waits, rate) in results.items()
    ]
    print_table(["fairness", "light msgs", "wait p50 ms", "wait max ms", "burst msgs/s"], rows)
    (unfair, unfair_rate), (fair, fair_rate) = results["none"], results["perUser"]
    print(
        f"perUser vs none: light users' max wait {max(fair) / max(unfair):.3f}x "
        f"(p50 {percentile(fair, 0.5) / percentile(unfair, 0.5):.3f}x), burst throughput "
        f"{fair_rate / unfair_rate:.2f}x. A light message's wait includes its own {HANDLER_MS} ms handler; "
        f"{WORKERS} workers x {SLOTS_PER_WORKER} slots."
    )


if __name__ == "__main__":
    main(sys.argv[1:])
