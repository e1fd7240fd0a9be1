"""Run every benchmark (``make bench``), or the ones named: ``python -m bench worker_throughput``."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = [
    "worker_throughput",
    "partitioned",
    "client_latency",
    "model_stream",
    "stream_cost",
    "tracing_cost",
    "cancel_latency",
    "fairness",
    "operator_reaction",
    "operator_cost",
    "node_coldstart",
    "gateway",
    "ha",
]


def main(argv: list[str]) -> int:
    names = argv or BENCHMARKS
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(BENCHMARKS)}")
        return 2
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        importlib.import_module(f"bench.{name}").main([])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
