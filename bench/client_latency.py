"""Client request -> reply latency at a paced offered load, against a worker in its own process.

The load is open-loop: request i is started at t0 + i/rate whether or not earlier ones have been
answered, so a slow reply cannot hide by slowing the sender down. The floor, measured the same way in
the same run, is a bare PING round trip from the same process: what loopback and the client library
cost before the queue adds anything. Target (issue 2): p99 <= 5 ms at 1,000 msg/s on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from streamqueue import Client, wire
from streamqueue.connection import RedisConnection, connect
from streamqueue_harness.redis_server import RedisServer
from streamqueue_harness.workerproc import spawn_worker

from bench.common import print_table

USERS = 50


@dataclass(frozen=True)
class PacedRun:
    """Latencies in ms; ``offered`` is the start rate actually reached (below the target when this
    process is starved of CPU), ``completed`` the rate until the last answer."""

    latencies: list[float]
    offered: float
    completed: float


async def paced(rate: float, count: int, call: Callable[[int], Awaitable[None]]) -> PacedRun:
    """Start ``call(i)`` at t0 + i/rate and time each call."""
    latencies: list[float] = []

    async def timed(i: int) -> None:
        start = time.perf_counter()
        await call(i)
        latencies.append((time.perf_counter() - start) * 1000)

    tasks = []
    t0 = time.perf_counter()
    for i in range(count):
        # Always yield, even when behind schedule, so started requests progress between starts.
        await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(timed(i)))
    offered = count / (time.perf_counter() - t0)
    await asyncio.gather(*tasks)
    return PacedRun(latencies, offered, count / (time.perf_counter() - t0))


def summary(name: str, run: PacedRun) -> list[object]:
    cuts = statistics.quantiles(run.latencies, n=100, method="inclusive")
    return [
        name,
        len(run.latencies),
        run.offered,
        run.completed,
        cuts[49],
        cuts[89],
        cuts[98],
        max(run.latencies),
    ]


def start_worker(url: str, stream: str) -> subprocess.Popen[bytes]:
    log = Path(tempfile.mkdtemp(prefix="sq-bench-latency-")) / "worker.log"
    return spawn_worker(url, "latency-worker", log, stream=stream)


async def wait_answering(url: str, stream: str) -> None:
    """Measure only once the worker answers, not while its process starts up."""
    async with Client(url, stream=stream) as client:
        await client.request("warmup", "are you there?", timeout=60)


async def measure_floor(url: str, rate: float, count: int) -> PacedRun:
    redis = connect(RedisConnection(url=url))
    # Open-loop load may briefly have many PINGs in flight; the pool must not be the bottleneck.
    redis.connection_pool.max_connections = 10_000
    try:

        async def ping(i: int) -> None:
            await redis.ping()

        return await paced(rate, count, ping)
    finally:
        await redis.aclose()


async def measure_requests(url: str, stream: str, rate: float, count: int, warmup: int) -> PacedRun:
    async with Client(url, stream=stream) as client:

        async def request(i: int) -> None:
            reply = await client.request(f"user{i % USERS}", f"hello {i}", timeout=10)
            if reply.response is None:
                raise RuntimeError(f"reply without a response: {reply.fields}")

        print(f"warm-up: {warmup} requests (one reader per user starts) ...", flush=True)
        await paced(rate, warmup, request)
        print(f"measuring: {count} requests at {rate:g}/s ...", flush=True)
        return await paced(rate, count, request)


async def run(args: argparse.Namespace) -> None:
    stream = "latency_queue"
    with RedisServer() as server:
        # Made here at 0 so no warm-up request can precede the group, whenever the worker starts.
        server.client().xgroup_create(stream, wire.DEFAULT_GROUP, id="0", mkstream=True)
        worker = start_worker(server.url, stream)
        try:
            print(
                f"redis-server on port {server.port}; worker pid {worker.pid}; "
                f"load average {os.getloadavg()[0]:.2f}",
                flush=True,
            )
            await wait_answering(server.url, stream)
            floor = await measure_floor(server.url, args.rate, args.count)
            requests = await measure_requests(server.url, stream, args.rate, args.count, args.warmup)
        finally:
            worker.terminate()
            worker.wait(timeout=30)
    print()
    headers = ["measured", "count", "offered/s", "completed/s", "p50 ms", "p90 ms", "p99 ms", "max ms"]
    rows = [summary("PING floor", floor), summary("request->reply", requests)]
    print_table(headers, [[*r[:4], *(f"{v:.2f}" for v in r[4:])] for r in rows])
    p99 = rows[1][6]
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print(f"request->reply p99 {p99:.2f} ms (target <= 5 ms): {'met' if p99 <= 5 else 'NOT met'}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.client_latency", description=__doc__)
    parser.add_argument("--rate", type=float, default=1000, help="offered requests per second")
    parser.add_argument("--count", type=int, default=5000, help="measured requests")
    parser.add_argument("--warmup", type=int, default=500, help="requests before measuring")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
