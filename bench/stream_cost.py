"""CPU per streamed token: worker + client + redis-server, each process measured on its own (issue 20).

200 concurrent requests (``--concurrency``) through the model handler, one worker process; a stub
OpenAI server in its own process streams 50 deltas (``--tokens``) 20 ms apart to each; the project's
``Client`` reads them with ``request_stream`` in a process of its own (on uvloop, as the gateway runs
it; ``--client-loop asyncio`` for asyncio's loop). CPU is read from ``/proc/<pid>/stat`` of the
worker, the client and redis-server over the streaming window only (after ``--concurrency`` warm-up
requests at once, which leave the worker's model connections open as in a deployment that has run a
while; ``--cold``: one), and divided by the tokens delivered (deltas the client got, counted in the
text, so a coalesced chunk counts as the tokens it holds). Latencies at the client: TTFT (request sent
-> first text), and the gap between successive chunks of one reply. Then redis-server's commands over
the window per 1,000 tokens (``INFO commandstats``: calls and the server's own time in each).

``--baseline-tree DIR`` (a ``git worktree`` of an older commit) runs the same measurement with that
tree's ``streamqueue`` for the worker and the client, alternating with this tree's, so "before" and
"after" come from the same run on the same, shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis
from streamqueue_harness.ports import free_port
from streamqueue_harness.processes import spawn, stop_groups
from streamqueue_harness.redis_server import RedisServer

from bench.common import THIS_TREE, percentile, print_table, process_cpu_seconds, tree_env
from bench.model_stream import worker_process

TOKENS = 50
INTERVAL_S = 0.02
PROCESSES = ("worker", "client", "redis")


@dataclass
class Measured:
    """One tree's figures, pooled over its repeats."""

    label: str
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PROCESSES, 0.0))
    runs: list[dict[str, float]] = field(default_factory=list)  # µs per token of each run
    commands: dict[str, list[float]] = field(default_factory=dict)  # redis command -> [calls, µs]

    def add(
        self, result: dict[str, list[float] | int], cpu_s: dict[str, float], commands: dict[str, list[float]]
    ) -> None:
        tokens = int(result["tokens"])  # type: ignore[arg-type]
        for name, (calls, usec) in commands.items():
            pooled = self.commands.setdefault(name, [0.0, 0.0])
            pooled[0] += calls
            pooled[1] += usec
        self.tokens += tokens
        self.ttft += result["ttft"]  # type: ignore[arg-type]
        self.gaps += result["gaps"]  # type: ignore[arg-type]
        for name, seconds in cpu_s.items():
            self.cpu_s[name] += seconds
        self.runs.append({name: seconds * 1e6 / tokens for name, seconds in cpu_s.items()})

    def us_per_token(self, name: str) -> float:
        return self.cpu_s[name] * 1e6 / self.tokens

    def row(self) -> list[object]:
        total = sum(self.us_per_token(name) for name in PROCESSES)
        spread = [sum(run.values()) for run in self.runs]
        return [
            self.label, self.tokens, *(self.us_per_token(name) for name in PROCESSES), total,
            f"{min(spread):.0f}-{max(spread):.0f}", percentile(self.ttft, 0.5), percentile(self.ttft, 0.99),
            percentile(self.gaps, 0.5), percentile(self.gaps, 0.99),
        ]  # fmt: skip

    def command_rows(self) -> list[list[object]]:
        """redis-server's commands per 1,000 tokens: where its µs/token go (``INFO commandstats``)."""
        per = 1000 / self.tokens
        ranked = sorted(self.commands.items(), key=lambda item: -item[1][1])
        return [[self.label, name, calls * per, usec * per / 1000] for name, (calls, usec) in ranked if calls]


def _commandstats(redis: Redis) -> dict[str, list[float]]:
    """Calls and µs spent per command so far (the server's own accounting, Lua's inner calls included)."""
    stats = redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): [float(v["calls"]), float(v["usec"])] for name, v in stats.items()}


async def _client(redis_url: str, concurrency: int, cold: bool) -> None:
    """The client process (``--client``): warm up, say ``ready``, stream on ``go``, print the figures."""
    from streamqueue import Client

    async with Client(redis_url, max_readers=concurrency + 10) as client:
        # As many requests at once as will stream: the worker's connections to the model server are
        # then open, as in a deployment that has run a while (``--cold``: one, as before 2026-12-05).
        warmups = 1 if cold else concurrency
        await asyncio.gather(*(client.request(f"warmup{i}", "hi", timeout=120) for i in range(warmups)))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        ttft: list[float] = []
        gaps: list[float] = []
        texts: list[str] = []

        async def user(u: int) -> None:
            last = time.perf_counter()
            parts: list[str] = []
            async for chunk in client.request_stream(f"u{u}", "tell me a story", timeout=120):
                now = time.perf_counter()
                (gaps if parts else ttft).append((now - last) * 1000)
                last = now
                parts.append(chunk)
            texts.append("".join(parts))

        await asyncio.gather(*(user(u) for u in range(concurrency)))
    tokens = sum(len(text.split()) for text in texts)
    print(json.dumps({"tokens": tokens, "ttft": ttft, "gaps": gaps}), flush=True)


def _measure(
    tree: Path, base_url: str, concurrency: int, cold: bool, client_loop: str, workdir: Path, into: Measured
) -> None:
    """One redis-server, worker process and client process with ``tree``'s code; adds to ``into``."""
    env = tree_env(tree)
    with RedisServer() as redis:
        log = workdir / f"worker-{into.label}-{len(into.runs)}.log"
        worker = worker_process(redis.url, base_url, concurrency, 0, log, env)
        command = [sys.executable, "-m", "bench.stream_cost", "--client", redis.url]
        client = subprocess.Popen(
            [*command, "--concurrency", str(concurrency), "--client-loop", client_loop, *(["--cold"] * cold)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=THIS_TREE,
            text=True,
        )
        assert client.stdin is not None and client.stdout is not None and redis.proc is not None
        pids = {"worker": worker.pid, "client": client.pid, "redis": redis.proc.pid}
        try:
            if client.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the client process failed (worker log: {log})")
            stats_before = _commandstats(redis.client())
            before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
            client.stdin.write("go\n")
            client.stdin.flush()
            result = json.loads(client.stdout.readline())
            after = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
            stats_after = _commandstats(redis.client())
            client.wait(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
            stop_groups([(worker.pid, worker)], grace=10)
    commands = {
        name: [calls - stats_before.get(name, [0.0, 0.0])[0], usec - stats_before.get(name, [0.0, 0.0])[1]]
        for name, (calls, usec) in stats_after.items()
        if name != "info"
    }
    into.add(result, {name: after[name] - before[name] for name in pids}, commands)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=TOKENS, help="deltas per reply, 20 ms apart")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-tree", type=Path, help="a worktree of the code to compare against")
    parser.add_argument("--tree", type=Path, default=THIS_TREE, help="the tree measured as 'this tree'")
    parser.add_argument(
        "--cold", action="store_true", help="warm up with one request: model connections open while measured"
    )
    parser.add_argument(
        "--client-loop", choices=("uvloop", "asyncio"), default="uvloop",
        help="the client process's event loop (uvloop, as the gateway runs it; asyncio before 2026-12-06)",
    )  # fmt: skip
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        run = asyncio.run
        if args.client_loop == "uvloop":  # as the gateway runs it (streamqueue.aio.run)
            import uvloop

            run = uvloop.run
        run(_client(args.client, args.concurrency, args.cold))
        return
    workdir = Path(tempfile.mkdtemp(prefix="sq-bench-cost-"))
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True)
    trees = [(Measured("this tree"), args.tree.resolve())]
    if args.baseline_tree is not None:
        trees.append((Measured(f"baseline {args.baseline_tree}"), args.baseline_tree.resolve()))
    port = free_port()
    stub_args = ["--stub-server", str(port), "--stub-words", str(args.tokens)]
    stub = spawn([sys.executable, "-m", "bench.model_stream", *stub_args], log=workdir / "stub.log")
    try:
        for repeat in range(args.repeats):
            for measured, tree in trees if repeat % 2 == 0 else trees[::-1]:
                base_url = f"http://127.0.0.1:{port}/v1"
                _measure(tree, base_url, args.concurrency, args.cold, args.client_loop, workdir, measured)
                print(f"  repeat {repeat + 1}: {measured.label} done", flush=True)
    finally:
        stop_groups([(stub.pid, stub)], grace=5)
    print()
    print_table(
        [
            "code", "tokens", *(f"{name} µs/token" for name in PROCESSES), "all µs/token", "all, per run",
            "TTFT p50 ms", "TTFT p99 ms", "gap p50 ms", "gap p99 ms",
        ],
        [measured.row() for measured, _ in trees],
    )  # fmt: skip
    print()
    print_table(
        ["code", "redis command", "calls per 1,000 tokens", "ms per 1,000 tokens"],
        [row for measured, _ in trees for row in measured.command_rows()],
    )
    print(
        f"{args.concurrency} concurrent x {args.tokens} tokens {INTERVAL_S * 1000:.0f} ms apart, one worker "
        f"process; CPU of each process over the streaming window / tokens delivered; {args.repeats} runs "
        "each. Targets (issue 20): all <= 60 µs/token, redis <= 10, gap p99 <= 60 ms."
    )


if __name__ == "__main__":
    main(sys.argv[1:])
