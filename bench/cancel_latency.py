"""Cancel latency: ``client.cancel`` -> the ``cancelled`` final entry at the client, for a streamed reply.

A worker process (``python -m streamqueue.worker``) runs ``slow_stream`` below, which streams a chunk
every 20 ms until it is cancelled. For each round the client starts a streamed request, waits for its
third chunk, calls ``client.cancel`` and times until ``request_stream`` ends with ``RequestCancelled``.
The path measured: ZADD pipeline + PUBLISH, the worker's Pub/Sub connection, the handler's task
cancelled, the cancelled entry committed with the XACK, and the client's reply reader.
Also the queued case: a request sent and cancelled before any worker could read it, timed from
``client.cancel`` to the cancelled entry once a worker (reading all the time) picks it up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from streamqueue import Client
from streamqueue.client import RequestCancelled
from streamqueue.handlers import Message
from streamqueue_harness.processes import stop_groups
from streamqueue_harness.redis_server import RedisServer
from streamqueue_harness.workerproc import spawn_worker

from bench.common import percentile, print_table

CHUNK_INTERVAL_S = 0.02


async def slow_stream(msg: Message) -> AsyncIterator[str]:
    """The worker's handler: ``"slow"`` streams until cancelled; anything else is answered at once."""
    if msg.message != "slow":
        yield "ok"
        return
    for i in range(100_000):
        yield f"c{i} "
        await asyncio.sleep(CHUNK_INTERVAL_S)


async def _running(client: Client, rounds: int) -> list[float]:
    latencies = []
    for n in range(rounds):
        stream = client.request_stream(f"u{n % 10}", "slow", request_id=f"run-{n}", timeout=30)
        t0 = 0.0
        chunks = 0
        try:
            async for _ in stream:
                chunks += 1
                if chunks == 3:
                    t0 = time.perf_counter()
                    await client.cancel(f"u{n % 10}", f"run-{n}")
        except RequestCancelled:
            latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


async def _queued(client: Client, rounds: int) -> list[float]:
    """Cancel right after sending: the worker usually reads the entry after the cancel is recorded
    (then the handler never sees it), sometimes just before (then the handler is cancelled)."""
    latencies = []
    for n in range(rounds):
        user, request_id = f"q{n}", f"q-{n}"
        await client.send(user, "slow", request_id=request_id)
        t0 = time.perf_counter()
        await client.cancel(user, request_id)
        try:  # resume from the start of the user's stream: the request is not sent again
            async for _ in client.request_stream(user, "", request_id=request_id, after="0-0", timeout=30):
                pass
        except RequestCancelled:
            latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


async def _measure(url: str, rounds: int) -> list[list[object]]:
    async with Client(url) as client:
        await client.request("warmup", "hi", timeout=60)  # the worker is up
        rows: list[list[object]] = []
        for label, run in (("running, mid-stream", _running), ("sent and cancelled at once", _queued)):
            ms = await run(client, rounds)
            rows.append(
                [label, len(ms), percentile(ms, 0.5), percentile(ms, 0.99), max(ms, default=float("nan"))]
            )
        return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="sq-bench-cancel-"))
    with RedisServer() as redis:
        bench_root = str(Path(__file__).resolve().parent.parent)
        base = {**os.environ, "PYTHONPATH": bench_root}  # the handler is in bench/
        handler = "bench.cancel_latency:slow_stream"
        worker = spawn_worker(redis.url, "bench", workdir / "worker.log", base, handler=handler)
        try:
            rows = asyncio.run(_measure(redis.url, args.rounds))
        finally:
            stop_groups([(worker.pid, worker)], grace=10)
    print_table(["cancelled", "rounds", "p50 ms", "p99 ms", "max ms"], rows)
    print("client.cancel called -> the cancelled final entry read by the client; one worker process.")


if __name__ == "__main__":
    main(sys.argv[1:])
