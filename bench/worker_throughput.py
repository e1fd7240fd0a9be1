"""Worker throughput against the article's loop, on one redis-server, in one run.

The baseline is the loop the article wrote: XREADGROUP COUNT 1, run the handler, one XADD for the
reply and one XACK, one message at a time. The contender is ``streamqueue.worker.Worker`` (batched
reads, many messages in flight, reply XADD + XACK pipelined). Each runs on a pre-loaded stream with
its own consumer group, timed from start until the group has nothing pending and no lag.

Targets (issue 2): no-op handler >= 20x the baseline; 50 ms handler >= 50x and >= 1,000 msg/s.
Figures are printed, never asserted: the machine's load decides them.

Then the worker as a pod runs it (issue 20): ``python -m streamqueue.worker`` in a process of its own,
default flags (batch 50, concurrency 100), the echo handler, 400 users; timed from its first delivery
until the group is drained, against the article's loop in the same run (target >= 60,000 msg/s and
>= 25x). ``--baseline-tree DIR`` (a ``git worktree`` of an older commit) runs that tree's worker too,
alternating with this one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
from streamqueue import wire
from streamqueue.connection import RedisConnection, connect
from streamqueue.handlers import Message
from streamqueue.settings import WorkerSettings
from streamqueue.worker import Worker
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.processes import stop_groups
from streamqueue_harness.redis_server import RedisServer
from streamqueue_harness.workerproc import spawn_worker

from bench.common import THIS_TREE, load_requests, print_table, process_cpu_seconds, tree_env, wait_drained

USERS = 100
PROCESS_USERS = 400
PROCESS_MESSAGES = 60_000


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


async def run_worker_process(
    url: str, redis_pid: int, stream: str, tree: Path, workdir: Path, extra_env: Mapping[str, str] = {}
) -> tuple[float, float, float]:
    """``tree``'s worker as its own process, default flags, echo handler, ``extra_env`` added to its
    environment: msg/s from its first delivery, and the worker's and redis-server's CPU µs per message
    meanwhile (hardly moved by the machine's load)."""
    redis = connect(RedisConnection(url=url))
    env = tree_env(tree, extra_env)
    try:
        await load_requests(redis, stream, PROCESS_MESSAGES, PROCESS_USERS)
        await redis.xgroup_create(stream, "streamqueue", id="0")
        log = workdir / f"{stream.replace(':', '-')}.log"
        worker = spawn_worker(url, "bench-worker", log, env, stream=stream, group="streamqueue")
        try:

            async def started() -> tuple[float, float] | None:
                info = next(g for g in await redis.xinfo_groups(stream) if g["name"] == "streamqueue")
                if not (info["pending"] or info["entries-read"]):
                    return None
                return time.perf_counter(), process_cpu_seconds(worker.pid), process_cpu_seconds(redis_pid)

            start, cpu, redis_cpu = await eventually_async(
                started, "the first delivery", 60, 0.002, TimeoutError
            )
            end = await wait_drained(redis, stream, "streamqueue")
            cpu = process_cpu_seconds(worker.pid) - cpu
            redis_cpu = process_cpu_seconds(redis_pid) - redis_cpu
        finally:
            stop_groups([(worker.pid, worker)], grace=10)
        per_msg = 1e6 / PROCESS_MESSAGES
        return PROCESS_MESSAGES / (end - start), cpu * per_msg, redis_cpu * per_msg
    finally:
        await redis.aclose()


async def measure_process(url: str, redis_pid: int, args: argparse.Namespace) -> list[list[object]]:
    """The worker process (and ``--baseline-tree``'s) against the article's loop, alternating rounds."""
    trees = [("this tree", args.tree.resolve())]
    if args.baseline_tree is not None:
        trees.append((f"baseline {args.baseline_tree}", args.baseline_tree.resolve()))
    workdir = Path(tempfile.mkdtemp(prefix="sq-bench-throughput-"))
    rates: dict[str, list[float]] = {name: [] for name, _ in trees}
    cpu: dict[str, list[float]] = {name: [] for name, _ in trees}
    redis_cpu: dict[str, list[float]] = {name: [] for name, _ in trees}
    articles = []
    for r in range(args.rounds):
        articles.append(await run_baseline(url, CASES[0], f"bench:p:{r}:article"))
        for name, tree in trees if r % 2 == 0 else trees[::-1]:
            stream = f"bench:p:{r}:{name[:4]}"
            rate, us_per_msg, redis_us = await run_worker_process(url, redis_pid, stream, tree, workdir)
            rates[name].append(rate)
            cpu[name].append(us_per_msg)
            redis_cpu[name].append(redis_us)
        done = ", ".join(
            f"{name} {rates[name][-1]:,.0f} msg/s ({cpu[name][-1]:.1f} µs CPU/msg)" for name, _ in trees
        )
        print(
            f"[worker process] round {r + 1}/{args.rounds}: {done}; article {articles[-1].per_second:,.0f}/s"
        )
    article = _median(articles).per_second
    rows: list[list[object]] = []
    for name, _ in trees:
        rate = statistics.median(rates[name])
        met = rate >= 60_000 and rate / article >= 25
        spread = f"{min(rates[name]):,.0f}-{max(rates[name]):,.0f}"
        rows.append(
            [
                f"no-op, worker process ({name})",
                article,
                rate,
                f"{rate / article:.1f}x",
                ">= 25x, >= 60,000/s",
                "yes" if met else "NO",
                spread,
                statistics.median(cpu[name]),
                statistics.median(redis_cpu[name]),
            ]
        )
    return rows


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
        for index, case in enumerate([] if args.process_only else CASES):
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
        assert server.proc is not None
        process_rows = await measure_process(server.url, server.proc.pid, args)
    print(f"\nmedians of {args.rounds} rounds; load average at the end {os.getloadavg()[0]:.2f}")
    print_table(
        ["handler", "article msg/s", "worker msg/s", "ratio", "target", "met", "per-CPU-second ratio"], rows
    )
    print(
        f"\nThe worker as its own process, default flags, {PROCESS_USERS} users, "
        f"{PROCESS_MESSAGES:,} messages:"
    )
    print_table(
        [
            "handler",
            "article msg/s",
            "worker msg/s",
            "ratio",
            "target",
            "met",
            "worker msg/s, per round",
            "worker CPU µs/msg",
            "redis CPU µs/msg",
        ],
        process_rows,
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_throughput", description=__doc__)
    parser.add_argument("--batch-size", type=int, default=500, help="worker XREADGROUP COUNT")
    parser.add_argument("--concurrency", type=int, default=1000, help="worker messages in flight")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per case (median)")
    parser.add_argument("--baseline-tree", type=Path, help="worker process: also this worktree's code")
    parser.add_argument("--process-only", action="store_true", help="only the worker-process rows")
    parser.add_argument("--tree", type=Path, default=THIS_TREE, help="worker process: the tree to measure")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
