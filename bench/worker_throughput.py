"""Worker throughput against the article's loop, on one redis-server, in one run.

The baseline is the loop the article wrote: XREADGROUP COUNT 1, run the handler, one XADD for the
reply and one XACK, one message at a time. The contender is ``streamqueue.worker.Worker`` (batched
reads, many messages in flight, reply XADD + XACK pipelined). Each runs on a pre-loaded stream with
its own consumer group, timed from start until the group has nothing pending and no lag.

Targets (issue 2): no-op handler >= 20x the baseline; 50 ms handler >= 50x and >= 1,000 msg/s.
Figures are printed, never asserted: the machine's load decides them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from streamqueue import wire
from streamqueue.connection import RedisConnection, connect
from streamqueue.handlers import Message
from streamqueue.settings import WorkerSettings
from streamqueue.worker import Worker
from streamqueue_harness.redis_server import RedisServer

from bench.common import load_requests, print_table, wait_drained

USERS = 100


async def noop(msg: Message) -> str:
    return "ok"


async def sleep_50ms(msg: Message) -> str:
    await asyncio.sleep(0.05)
    return "ok"


@dataclass(frozen=True)
class Case:
    name: str
    handler: Callable[[Message], Awaitable[str]]
    baseline_messages: int
    worker_messages: int
    target_ratio: float
    target_rate: float = 0.0


CASES = [
    Case("no-op handler", noop, baseline_messages=2000, worker_messages=30_000, target_ratio=20),
    Case(
        "50 ms handler",
        sleep_50ms,
        baseline_messages=40,
        worker_messages=6000,
        target_ratio=50,
        target_rate=1000,
    ),
]


async def article_loop(
    redis: aioredis.Redis,
    stream: str,
    group: str,
    handler: Callable[[Message], Awaitable[str]],
    messages: int,
) -> None:
    """The article's worker loop, kept as written there: one message per read, reply, ack."""
    consumer = "article-worker"
    processed = 0
    while processed < messages:
        result = await redis.xreadgroup(group, consumer, {stream: ">"}, count=1, block=1000)
        for _, entries in result or []:
            for entry_id, fields in entries:
                msg = Message(entry_id, stream, fields[wire.USER_ID], fields[wire.MESSAGE], None, 1, fields)
                response = await handler(msg)
                await redis.xadd(
                    wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, fields[wire.USER_ID]),
                    {wire.RESPONSE: response, wire.WORKER_ID: consumer, wire.TIMESTAMP: repr(time.time())},
                )
                await redis.xack(stream, group, entry_id)
                processed += 1


@dataclass(frozen=True)
class Throughput:
    """Messages per wall-clock second, and per CPU-second of this process (the consumer's cost).

    The second figure hardly moves with the machine's load, so it is the one to compare across runs
    on a busy machine; it excludes redis-server's own CPU.
    """

    per_second: float
    per_cpu_second: float


class _Clock:
    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def throughput(self, messages: int, wall_end: float) -> Throughput:
        return Throughput(messages / (wall_end - self.wall), messages / (time.process_time() - self.cpu))


async def _prepare(redis: aioredis.Redis, stream: str, group: str, messages: int) -> None:
    await load_requests(redis, stream, messages, USERS)
    await redis.xgroup_create(stream, group, id="0")


async def run_baseline(url: str, case: Case, stream: str) -> Throughput:
    redis = connect(RedisConnection(url=url))
    try:
        await _prepare(redis, stream, "article", case.baseline_messages)
        clock = _Clock()
        await article_loop(redis, stream, "article", case.handler, case.baseline_messages)
        end = await wait_drained(redis, stream, "article")
        return clock.throughput(case.baseline_messages, end)
    finally:
        await redis.aclose()


def worker_settings(url: str, stream: str, batch_size: int, concurrency: int) -> WorkerSettings:
    return WorkerSettings(
        redis_url=url,
        stream=stream,
        group="streamqueue",
        consumer="bench-worker",
        batch_size=batch_size,
        concurrency=concurrency,
        health_port=0,
    )


async def run_worker(url: str, case: Case, stream: str, batch_size: int, concurrency: int) -> Throughput:
    redis = connect(RedisConnection(url=url))
    try:
        await _prepare(redis, stream, "streamqueue", case.worker_messages)
        worker = Worker(worker_settings(url, stream, batch_size, concurrency), handler=case.handler)
        clock = _Clock()
        task = asyncio.create_task(worker.run())
        end = await wait_drained(redis, stream, "streamqueue")
        result = clock.throughput(case.worker_messages, end)
        worker.request_stop()
        await task
        return result
    finally:
        await redis.aclose()


async def measure_case(
    url: str, case: Case, index: int, args: argparse.Namespace
) -> tuple[Throughput, Throughput]:
    """Alternate baseline and worker rounds so a change in machine load hits both; return medians."""
    baselines, workers = [], []
    for r in range(args.rounds):
        baseline = await run_baseline(url, case, f"bench:{index}:{r}:article")
        worker = await run_worker(url, case, f"bench:{index}:{r}:worker", args.batch_size, args.concurrency)
        print(
            f"[{case.name}] round {r + 1}/{args.rounds}: "
            f"article loop {baseline.per_second:,.1f} msg/s, {baseline.per_cpu_second:,.0f} msg/CPU-s "
            f"({case.baseline_messages} msgs); "
            f"Worker {worker.per_second:,.1f} msg/s, {worker.per_cpu_second:,.0f} msg/CPU-s "
            f"({case.worker_messages} msgs)",
            flush=True,
        )
        baselines.append(baseline)
        workers.append(worker)
    return _median(baselines), _median(workers)


def _median(runs: list[Throughput]) -> Throughput:
    return Throughput(
        statistics.median(r.per_second for r in runs), statistics.median(r.per_cpu_second for r in runs)
    )


async def run(args: argparse.Namespace) -> None:
    rows = []
    with RedisServer() as server:
        print(
            f"redis-server on port {server.port}; Worker batch {args.batch_size}, concurrency "
            f"{args.concurrency}; {args.rounds} rounds; load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        for index, case in enumerate(CASES):
            baseline, worker = await measure_case(server.url, case, index, args)
            ratio = worker.per_second / baseline.per_second
            met = ratio >= case.target_ratio and worker.per_second >= case.target_rate
            target = f">= {case.target_ratio:g}x" + (
                f", >= {case.target_rate:,.0f}/s" if case.target_rate else ""
            )
            cpu_ratio = worker.per_cpu_second / baseline.per_cpu_second
            rows.append(
                [
                    case.name,
                    baseline.per_second,
                    worker.per_second,
                    f"{ratio:.1f}x",
                    target,
                    "yes" if met else "NO",
                    f"{cpu_ratio:.1f}x",
                ]
            )
    print(f"\nmedians of {args.rounds} rounds; load average at the end {os.getloadavg()[0]:.2f}")
    print_table(
        ["handler", "article msg/s", "worker msg/s", "ratio", "target", "met", "per-CPU-second ratio"], rows
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_throughput", description=__doc__)
    parser.add_argument("--batch-size", type=int, default=500, help="worker XREADGROUP COUNT")
    parser.add_argument("--concurrency", type=int, default=1000, help="worker messages in flight")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per case (median)")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
