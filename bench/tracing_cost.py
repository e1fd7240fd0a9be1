"""What OpenTelemetry tracing costs the worker (issue 21): off must cost nothing.

The worker as a pod runs it (``bench.worker_throughput``'s worker-process phase: ``python -m
streamqueue.worker``, default flags, the echo handler, 60,000 pre-loaded messages from 400 users):
``--baseline-tree`` (a ``git worktree`` of the commit before the instrumentation), this tree with
tracing off (no ``OTEL_*`` variable), and, if the collector is built (hack/tools.sh ``otelcol``), this
tree with tracing on, exporting every span over OTLP/HTTP to a real collector, and on with 1 % of the
requests sampled (``parentbased_traceidratio``). Rounds alternate the
order; medians of msg/s and of the worker's CPU µs per message are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from streamqueue_harness.otelcol import Collector
from streamqueue_harness.redis_server import RedisServer

from bench.common import THIS_TREE, print_table
from bench.worker_throughput import run_worker_process


async def measure(args: argparse.Namespace, collector: Collector | None) -> list[list[object]]:
    contenders: list[tuple[str, Path, dict[str, str]]] = []
    if args.baseline_tree is not None:
        contenders.append((f"before ({args.baseline_tree})", args.baseline_tree.resolve(), {}))
    contenders.append(("tracing off", args.tree.resolve(), {}))
    if collector is not None:
        on = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_SERVICE_NAME": "bench-worker"}
        contenders.append(("tracing on (OTLP to a collector)", args.tree.resolve(), on))
        sampled = {**on, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}
        contenders.append(("tracing on, 1 % sampled", args.tree.resolve(), sampled))
    rates: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
    workdir = Path(tempfile.mkdtemp(prefix="sq-bench-tracing-"))
    with RedisServer() as server:
        assert server.proc is not None
        for r in range(args.rounds):
            for i, (name, tree, env) in enumerate(contenders if r % 2 == 0 else contenders[::-1]):
                url, pid = server.url, server.proc.pid
                rate, us, _ = await run_worker_process(url, pid, f"bench:t:{r}:{i}", tree, workdir, env)
                rates[name].append(rate)
                cpu[name].append(us)
            print(
                f"round {r + 1}/{args.rounds}: "
                + "; ".join(f"{n} {rates[n][-1]:,.0f} msg/s, {cpu[n][-1]:.1f} µs" for n, _, _ in contenders),
                flush=True,
            )
    return [
        [
            name,
            statistics.median(rates[name]),
            f"{min(rates[name]):,.0f}-{max(rates[name]):,.0f}",
            statistics.median(cpu[name]),
        ]
        for name, _, _ in contenders
    ]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing_cost", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median)")
    parser.add_argument("--baseline-tree", type=Path, help="a worktree of the code before tracing")
    parser.add_argument("--tree", type=Path, default=THIS_TREE, help="the tree measured with tracing")
    parser.add_argument("--no-collector", action="store_true", help="skip the tracing-on contender")
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with ExitStack() as stack:
        collector = None if args.no_collector else stack.enter_context(Collector())
        rows = asyncio.run(measure(args, collector))
    print(f"\nmedians of {args.rounds} rounds; load average at the end {os.getloadavg()[0]:.2f}")
    print_table(["worker", "msg/s", "msg/s per round", "worker CPU µs/msg"], rows)


if __name__ == "__main__":
    main(sys.argv[1:])
