"""Partitioned queues: 1 partition on one redis-server vs 6 partitions on a 3-primary Redis Cluster, and
what per-user order costs on the cluster; all in one run, with the same worker processes.

Every contender is the same fleet: ``--workers`` ``python -m streamqueue.worker`` processes (defaults
for batch size and concurrency, as in a pod), configured by env. The queue is pre-loaded with
``--messages`` requests from ``--users`` users, routed the documented way (``wire.partition_of``),
behind each partition's group (created at ``$``) so the workers start idle. Once every worker is ready
(``/readyz``; with ``ordering: perUser`` also every partition's lease held by its rendezvous owner),
the clock starts: one pipelined ``XGROUP SETID <group> 0 ENTRIESREAD 0`` per partition hands the
backlog over, and one more request per partition wakes the blocked reads. The clock stops when every
partition's group has nothing pending and no lag.

Contenders: 1 partition on one redis-server (the baseline), 6 partitions on the same redis-server
(what partitioning costs by itself), 6 partitions on the cluster, and the same with ``ordering:
perUser``. Handlers: the echo handler (the queue's own cost) and ``streamqueue_harness.demo_handler``
awaiting 20 ms (an I/O-bound handler). Contenders alternate within each round, the median is printed,
with the CPU the workers and every Redis process (replicas included) spent per 1,000 messages, and
each run counts the replies written.

On a 2-core machine every Redis node (6 for the cluster) and every worker share the same two cores:
the figures show the cost of partitioning and of the cluster's routing, not the cluster's scaling.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamqueue import wire
from streamqueue.connection import RedisConnection, connect_any
from streamqueue.settings import ECHO_HANDLER, WorkerSettings
from streamqueue.worker.leases import owner
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.ports import free_port
from streamqueue_harness.processes import stop_groups
from streamqueue_harness.redis_cluster import RedisClusterServer
from streamqueue_harness.redis_server import RedisServer
from streamqueue_harness.workerproc import spawn_worker

from bench.common import LOAD_BATCH, print_table, process_cpu_seconds

GROUP = wire.DEFAULT_GROUP
READY_TIMEOUT_S = 60.0
POLL_S = 0.01


@dataclass(frozen=True)
class Handler:
    name: str
    env: dict[str, str]


HANDLERS = [
    Handler("echo (no-op)", {"STREAMQUEUE_HANDLER": ECHO_HANDLER}),
    Handler(
        "20 ms await",
        {"STREAMQUEUE_HANDLER": "streamqueue_harness.demo_handler:handle", "STREAMQUEUE_DEMO_DELAY_MS": "20"},
    ),
]


@dataclass(frozen=True)
class Target:
    """Where a contender's queue lives and how it is shaped."""

    name: str
    url: str
    cluster: bool
    partitions: int
    ordering: str = "none"


@dataclass(frozen=True)
class Result:
    """One drained run (a run that does not drain in time raises instead)."""

    messages: int
    seconds: float
    worker_cpu_s: float  # the worker processes' CPU between release and drained
    redis_cpu_s: float  # every Redis process's (on the cluster: primaries and replicas)
    answered: int  # reply entries written

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def cpu_ms_per_1k(self, cpu_s: float) -> float:
        return cpu_s * 1000 / (self.messages / 1000)


class Fleet:
    """The worker processes of one run, each with its own health port; stopped (SIGTERM, then KILL)."""

    def __init__(self, target: Target, handler: Handler, stream: str, reply_prefix: str, count: int) -> None:
        self.logs = Path(tempfile.mkdtemp(prefix="sq-bench-partitioned-"))
        self.ports = [free_port() for _ in range(count)]
        self.names = [f"w-{i + 1}" for i in range(count)]
        settings = {
            "redis_cluster": "true" if target.cluster else "false",
            "stream": stream,
            "reply_prefix": reply_prefix,
            "partitions": str(target.partitions),
            "ordering": target.ordering,
            "health_host": "127.0.0.1",
            "log_level": "WARNING",
        }
        base = {**os.environ, **handler.env}
        self.procs = [
            spawn_worker(target.url, name, self.logs / f"{name}.log", base, health_port=str(port), **settings)
            for name, port in zip(self.names, self.ports, strict=True)
        ]

    def all_ready(self) -> bool:
        for proc, name, port in zip(self.procs, self.names, self.ports, strict=True):
            if proc.poll() is not None:
                log = (self.logs / f"{name}.log").read_text()[-2000:]
                raise RuntimeError(f"worker {name} exited with {proc.returncode}:\n{log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as reply:
                    if reply.status != 200:
                        return False
            except OSError:
                return False
        return True

    def cpu_seconds(self) -> float:
        """User + system CPU of every worker process so far."""
        return sum(process_cpu_seconds(proc.pid) for proc in self.procs)

    def stop(self) -> None:
        stop_groups([(p.pid, p) for p in self.procs], grace=30)


async def load(redis: Any, stream: str, partitions: int, messages: int, users: int) -> list[str]:
    """Pre-load the partitions behind a group at ``$``; returns a user routed to each partition."""
    keys = wire.partition_streams(stream, partitions)
    for start in range(0, messages, LOAD_BATCH):
        pipe = redis.pipeline(transaction=False)
        for i in range(start, min(start + LOAD_BATCH, messages)):
            user = f"user{i % users}"
            key = keys[wire.partition_of(user, partitions)]
            pipe.xadd(
                key, {wire.USER_ID: user, wire.MESSAGE: f"message {i}", wire.TIMESTAMP: repr(time.time())}
            )
        await pipe.execute()
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.xgroup_create(key, GROUP, id="$", mkstream=True)
    await pipe.execute()
    firsts: dict[int, str] = {}
    for u in range(users):
        firsts.setdefault(wire.partition_of(f"user{u}", partitions), f"user{u}")
    return [firsts[p] for p in range(partitions)]


async def leases_settled(redis: Any, keys: list[str], workers: list[str]) -> bool:
    """Every partition's lease is held by the worker the rendezvous assignment gives it to."""
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.get(wire.lease_key(key))
    holders = await pipe.execute()
    return all(h == owner(k, workers) for k, h in zip(keys, holders, strict=True))


async def release(redis: Any, keys: list[str], wakers: list[str]) -> None:
    """Hand the whole backlog to the group at once, then wake the blocked reads with one entry each."""
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.xgroup_setid(key, GROUP, "0", entries_read=0)
    await pipe.execute()
    pipe = redis.pipeline(transaction=False)
    for key, user in zip(keys, wakers, strict=True):
        pipe.xadd(key, {wire.USER_ID: user, wire.MESSAGE: "wake", wire.TIMESTAMP: repr(time.time())})
    await pipe.execute()


async def drained(redis: Any, keys: list[str]) -> bool:
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.xinfo_groups(key)
    for groups in await pipe.execute():
        info = next(wire.GroupInfo.from_reply(g) for g in groups if g["name"] == GROUP)
        if info.pending != 0 or info.lag != 0:
            return False
    return True


async def dead_letters(redis: Any, keys: list[str]) -> int:
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.xlen(wire.dead_letter_stream(key))
    return sum(await pipe.execute())


async def redis_cpu_seconds(redis: Any, cluster: bool) -> float:
    """used_cpu_user + used_cpu_sys of the server, or summed over every node of the cluster."""
    if not cluster:
        infos = [await redis.info("cpu")]
    else:
        infos = list((await redis.info("cpu", target_nodes=redis.ALL_NODES)).values())
    return sum(float(i["used_cpu_user"]) + float(i["used_cpu_sys"]) for i in infos)


async def answered(redis: Any, reply_prefix: str, users: int) -> int:
    """Reply entries on every user's reply stream (each is far below its MAXLEN here)."""
    pipe = redis.pipeline(transaction=False)
    for u in range(users):
        pipe.xlen(wire.reply_stream(reply_prefix, f"user{u}"))
    return sum(await pipe.execute())


async def until(check: Any, limit_s: float, what: str) -> None:
    """Poll ``check`` (an async predicate) every 10 ms until true; bounded by ``limit_s``."""
    await eventually_async(check, what, limit_s, POLL_S, TimeoutError)


async def run_once(target: Target, handler: Handler, run: int, args: argparse.Namespace) -> Result:
    stream, reply_prefix = f"bench-p:{run}", f"bench-p-reply:{run}:"
    keys = wire.partition_streams(stream, target.partitions)
    redis = connect_any(RedisConnection(url=target.url, cluster=target.cluster))
    fleet: Fleet | None = None
    try:
        wakers = await load(redis, stream, target.partitions, args.messages, args.users)
        fleet = Fleet(target, handler, stream, reply_prefix, args.workers)
        ready = fleet

        async def all_ready() -> bool:
            return await asyncio.to_thread(ready.all_ready)

        await until(all_ready, READY_TIMEOUT_S, f"{target.name}: workers ready")
        if target.ordering == "perUser":

            async def settled() -> bool:
                return await leases_settled(redis, keys, ready.names)

            await until(settled, READY_TIMEOUT_S, f"{target.name}: leases settled")
            spread = [sum(owner(k, ready.names) == w for k in keys) for w in ready.names]
            print(f"  perUser: partitions per worker {'/'.join(map(str, spread))}", flush=True)
        cpu_workers, cpu_redis = fleet.cpu_seconds(), await redis_cpu_seconds(redis, target.cluster)
        start = time.perf_counter()
        await release(redis, keys, wakers)

        async def done() -> bool:
            return await drained(redis, keys)

        await until(done, args.timeout, f"{target.name}, {handler.name}: drain")
        seconds = time.perf_counter() - start
        cpu_workers = fleet.cpu_seconds() - cpu_workers
        cpu_redis = await redis_cpu_seconds(redis, target.cluster) - cpu_redis
        dead = await dead_letters(redis, keys)
        if dead:
            print(f"  warning: {dead} messages were dead-lettered, not answered", flush=True)
        replies = await answered(redis, reply_prefix, args.users)
        return Result(args.messages + len(keys), seconds, cpu_workers, cpu_redis, replies)
    finally:
        if fleet is not None:
            await asyncio.to_thread(fleet.stop)
        try:
            pipe = redis.pipeline(transaction=False)
            for key in keys:  # one DEL per key: on a cluster the partitions are in different slots
                pipe.delete(key)
                pipe.delete(wire.dead_letter_stream(key))
            await pipe.execute()
        finally:
            await redis.aclose()


@dataclass(frozen=True)
class Median:
    rate: float
    worker_cpu: float  # ms per 1,000 messages
    redis_cpu: float


async def measure(
    targets: list[Target], handler: Handler, args: argparse.Namespace, counter: list[int]
) -> dict[str, Median]:
    results: dict[str, list[Result]] = {t.name: [] for t in targets}
    for r in range(args.rounds):
        order = targets if r % 2 == 0 else list(reversed(targets))
        for target in order:
            counter[0] += 1
            result = await run_once(target, handler, counter[0], args)
            results[target.name].append(result)
            print(
                f"[{handler.name}] round {r + 1}/{args.rounds}: {target.name}: {result.messages:,} msgs "
                f"in {result.seconds:.2f}s = {result.rate:,.0f} msg/s ({result.answered:,} replies); CPU "
                f"per 1k msgs: workers {result.cpu_ms_per_1k(result.worker_cpu_s):.0f} ms, Redis "
                f"{result.cpu_ms_per_1k(result.redis_cpu_s):.0f} ms; load average {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    return {
        name: Median(
            statistics.median(r.rate for r in runs),
            statistics.median(r.cpu_ms_per_1k(r.worker_cpu_s) for r in runs),
            statistics.median(r.cpu_ms_per_1k(r.redis_cpu_s) for r in runs),
        )
        for name, runs in results.items()
    }


async def run(args: argparse.Namespace) -> None:
    defaults = WorkerSettings.model_fields
    print(
        f"{args.workers} worker processes (batch {defaults['batch_size'].default}, concurrency "
        f"{defaults['concurrency'].default} each); {args.messages:,} messages from {args.users:,} users per "
        f"run; {args.rounds} rounds; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    with RedisServer() as server, RedisClusterServer() as cluster:
        print(f"redis-server on port {server.port}; Redis Cluster of 3 primaries + 3 replicas", flush=True)
        n = args.partitions
        single = Target("1 partition, 1 redis-server", server.url, cluster=False, partitions=1)
        split = Target(f"{n} partitions, 1 redis-server", server.url, cluster=False, partitions=n)
        parted = Target(f"{n} partitions, cluster", cluster.url, cluster=True, partitions=n)
        ordered = Target(f"{n} partitions, cluster, perUser", cluster.url, True, n, "perUser")
        targets = [single, split, parted, ordered]
        counter = [0]
        medians = {handler.name: await measure(targets, handler, args, counter) for handler in HANDLERS}
    print(f"\nmedians of {args.rounds} rounds; load average at the end {os.getloadavg()[0]:.2f}")
    print(f"\n(a) the same {args.workers} worker processes: 1 partition on one Redis vs {n} on the cluster")
    rows: list[list[object]] = []
    for handler, m in medians.items():
        one, many = m[single.name].rate, m[parted.name].rate
        rows.append([handler, one, m[split.name].rate, many, f"{many / one:.2f}x"])
    print_table(
        ["handler", "1 partition, 1 Redis", f"{n} partitions, 1 Redis", f"{n} partitions, cluster", "ratio"],
        rows,
    )
    print(f"\n(b) per-user order on the cluster ({n} partitions, the same workers)")
    rows = []
    for handler, m in medians.items():
        free, ordered_rate = m[parted.name].rate, m[ordered.name].rate
        rows.append([handler, free, ordered_rate, f"{ordered_rate / free:.2f}x"])
    print_table(["handler", "ordering none msg/s", "ordering perUser msg/s", "ratio"], rows)
    print("\nCPU per 1,000 messages (ms): worker processes / every Redis process")
    rows = [
        [handler, *(f"{m[t.name].worker_cpu:.0f} / {m[t.name].redis_cpu:.0f}" for t in targets)]
        for handler, m in medians.items()
    ]
    print_table(["handler", *(t.name for t in targets)], rows)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.partitioned", description=__doc__)
    parser.add_argument("--workers", type=int, default=3, help="worker processes in every contender")
    parser.add_argument("--partitions", type=int, default=6, help="partitions on the cluster")
    parser.add_argument("--messages", type=int, default=20_000, help="pre-loaded messages per run")
    parser.add_argument("--users", type=int, default=1000, help="distinct users sending them")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per handler (median)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds a run may take to drain")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
