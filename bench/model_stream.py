"""Time to first chunk and p99 between chunks of streamed replies through the model handler.

Client (``request_stream``) -> redis-server -> a worker process running streamqueue.handlers.openai ->
an OpenAI-compatible server, and back through the user's reply stream. Two servers, printed apart:

- stub: an aiohttp server in its own process that streams 20 deltas 20 ms apart in OpenAI's exact
  SSE format (50 tokens/s per reply, like a real GPU server), at 1,000 concurrent requests (issue 13),
  i.e. 50,000 deltas/s offered. This measures the queue's own cost: TTFC floor = the stub's first
  delta, inter-chunk floor = 20 ms. Measured in the same run, on the same machine: 1 request (the
  floor) and 100 concurrent (the baseline, 5,000 deltas/s offered), and the 1,000 row's ratios to the
  baseline. Every process (client, worker, redis-server, stub) shares this machine's cores, so the
  CPU table says how much of the machine each used: when the processes together keep every core
  busy, the figures are the machine's, not the queue's.
- llama: llama-cpp-python's server on the tiny generated model (hack/llama.sh), at a small concurrency:
  a CPU llama server decodes one sequence at a time, so 1,000 concurrent requests would measure its
  queue, not ours.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from aiohttp import web
from redis import Redis
from streamqueue import Client
from streamqueue_harness.modelserver import ModelServer, llama_python, stream_completion
from streamqueue_harness.ports import free_port
from streamqueue_harness.processes import spawn, stop_groups
from streamqueue_harness.redis_server import RedisServer
from streamqueue_harness.workerproc import spawn_worker

from bench.common import percentile, print_table, process_cpu_seconds

STUB_WORDS = 20
STUB_INTERVAL_S = 0.02
PROCESSES = ("client", "worker", "redis", "stub")


@dataclass
class Measured:
    """What one configuration gave, over every repeat: latencies (ms), wall time and CPU per process."""

    concurrency: int
    ttfc: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    words: int = 0
    elapsed_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PROCESSES, 0.0))

    @property
    def chunks(self) -> int:
        """Deltas delivered: the words of the text (one per stub delta), since the worker may join
        deltas that wait together into one chunk (``chunk_flush_ms``)."""
        return self.words

    @property
    def rate(self) -> float:
        return self.chunks / self.elapsed_s

    def add(
        self, ttfc: list[float], gaps: list[float], words: int, elapsed_s: float, cpu_s: dict[str, float]
    ) -> None:
        self.ttfc += ttfc
        self.gaps += gaps
        self.words += words
        self.elapsed_s += elapsed_s
        for name, seconds in cpu_s.items():
            self.cpu_s[name] += seconds

    def figures(self) -> list[object]:
        return [
            self.concurrency, len(self.ttfc), percentile(self.ttfc, 0.5), percentile(self.ttfc, 0.99),
            percentile(self.gaps, 0.5), percentile(self.gaps, 0.99), self.rate,
        ]  # fmt: skip


async def _run(
    redis_url: str, concurrency: int, rounds: int, cpu: Callable[[], dict[str, float]]
) -> tuple[list[float], list[float], int, float, dict[str, float]]:
    """``concurrency`` users each stream ``rounds`` requests one after another; TTFC and gaps in ms,
    the words delivered, the wall time (s) and the CPU seconds each process spent meanwhile (``cpu``:
    the others' so far)."""
    ttfc: list[float] = []
    gaps: list[float] = []
    words = 0
    async with Client(redis_url, max_readers=concurrency + 10) as client:
        await client.request("warmup", "hi", timeout=120)  # the worker is up and the model loaded

        async def user(u: int) -> None:
            nonlocal words
            for _ in range(rounds):
                start = last = time.perf_counter()
                first = True
                async for chunk in client.request_stream(f"u{u}", "tell me a story", timeout=300):
                    now = time.perf_counter()
                    words += len(chunk.split())
                    (ttfc if first else gaps).append((now - (start if first else last)) * 1000)
                    first, last = False, now

        before = {**cpu(), "client": time.process_time()}
        t0 = time.perf_counter()
        await asyncio.gather(*(user(u) for u in range(concurrency)))
        elapsed = time.perf_counter() - t0
        after = {**cpu(), "client": time.process_time()}
        return ttfc, gaps, words, elapsed, {name: after[name] - before[name] for name in after}


def worker_process(
    redis_url: str,
    base_url: str,
    concurrency: int,
    max_tokens: int,
    log: Path,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A worker process running the model handler against ``base_url`` (``env``: its base environment)."""
    settings = {
        "handler": "streamqueue.handlers.openai:handle",
        "openai_base_url": base_url,
        "openai_model": "tiny",
        "concurrency": str(concurrency),
        "batch_size": "200",
        **({"openai_max_tokens": str(max_tokens)} if max_tokens else {}),
    }
    return spawn_worker(redis_url, "bench", log, env, **settings)


def _measure(
    base_url: str,
    concurrency: int,
    rounds: int,
    max_tokens: int,
    workdir: Path,
    into: Measured,
    server_pid: int | None = None,
) -> None:
    """One worker process and redis-server for one configuration; adds what it measured to ``into``."""
    with RedisServer() as redis:
        log = workdir / f"worker-{concurrency}-{len(os.listdir(workdir))}.log"
        worker = worker_process(redis.url, base_url, concurrency, max_tokens, log)
        cpu = partial(_cpu, worker.pid, redis.client(), server_pid)
        try:
            into.add(*asyncio.run(_run(redis.url, concurrency, rounds, cpu)))
        finally:
            stop_groups([(worker.pid, worker)], grace=10)


def _cpu(worker_pid: int, redis: Redis, server_pid: int | None) -> dict[str, float]:
    stats = redis.info("cpu")
    cpu = {
        "worker": process_cpu_seconds(worker_pid),
        "redis": float(stats["used_cpu_user"]) + float(stats["used_cpu_sys"]),
    }
    if server_pid is not None:
        cpu["stub"] = process_cpu_seconds(server_pid)
    return cpu


def _serve_stub(port: int, words: int) -> None:
    """The stub server process (``--stub-server PORT``): ``words`` deltas, ``STUB_INTERVAL_S`` apart."""

    async def respond(request: web.Request) -> web.StreamResponse:
        await request.read()
        return await stream_completion(request, [f"w{i} " for i in range(words)], STUB_INTERVAL_S)

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", respond)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        await asyncio.Event().wait()

    asyncio.run(serve())


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=1000, help="stub: concurrent requests")
    parser.add_argument("--baseline", type=int, default=100, help="stub: the baseline's concurrent requests")
    parser.add_argument("--repeats", type=int, default=3, help="stub: runs of each configuration")
    parser.add_argument("--llama-concurrency", type=int, default=4)
    parser.add_argument("--stub-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stub-words", type=int, default=STUB_WORDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stub_server:
        _serve_stub(args.stub_server, args.stub_words)
        return
    workdir = Path(tempfile.mkdtemp(prefix="sq-bench-model-"))
    cores = os.cpu_count() or 1
    print(f"{cores} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True)
    configs = [Measured(1), Measured(args.baseline), Measured(args.concurrency)]
    port = free_port()
    stub = spawn(
        [sys.executable, "-m", "bench.model_stream", "--stub-server", str(port)], log=workdir / "stub.log"
    )
    try:
        for repeat in range(args.repeats):
            for config in configs if repeat % 2 == 0 else configs[::-1]:  # alternate: load drifts hit all
                _measure(f"http://127.0.0.1:{port}/v1", config.concurrency, 1, 0, workdir, config, stub.pid)
                print(f"  repeat {repeat + 1}: {config.concurrency} concurrent done", flush=True)
    finally:
        stop_groups([(stub.pid, stub)], grace=5)
    llama: Measured | None = None
    python = llama_python()
    if python is None:
        print("llama: skipped, no llama-cpp-python venv (run `bash hack/llama.sh`)")
    else:
        with ModelServer(python, workdir=workdir / "llama") as server:
            llama = Measured(args.llama_concurrency)
            _measure(server.base_url, args.llama_concurrency, 2, 16, workdir, llama)
    _report(configs, llama, args.repeats, cores)


def _report(configs: list[Measured], llama: Measured | None, repeats: int, cores: int) -> None:
    floor, baseline, target = configs
    stub = f"stub ({STUB_WORDS} deltas, {STUB_INTERVAL_S * 1000:.0f} ms apart)"
    per_reply = STUB_WORDS / (STUB_WORDS * STUB_INTERVAL_S)  # deltas/s one reply offers
    rows = [
        [stub, *m.figures(), m.concurrency * per_reply, f"{m.rate / (m.concurrency * per_reply):.0%}"]
        for m in configs
    ]
    if llama is not None:
        rows.append(["llama-cpp-python, tiny model (16 tokens)", *llama.figures(), "-", "-"])
    print()
    print_table(
        [
            "server", "concurrent", "replies", "TTFC p50 ms", "TTFC p99 ms", "gap p50 ms", "gap p99 ms",
            "deltas/s", "offered/s", "served/offered",
        ],
        rows,
    )  # fmt: skip
    print(
        f"TTFC: request sent -> first chunk at the client; gap: between successive chunks of one reply; "
        f"stub rows pool {repeats} runs each."
    )
    print(f"\n{target.concurrency} concurrent against the {baseline.concurrency}-concurrent baseline:")
    print_table(
        ["TTFC p50", "TTFC p99", "gap p50", "gap p99", "deltas/s", "ideal deltas/s"],
        [
            [
                _ratio(percentile(target.ttfc, 0.5), percentile(baseline.ttfc, 0.5)),
                _ratio(percentile(target.ttfc, 0.99), percentile(baseline.ttfc, 0.99)),
                _ratio(percentile(target.gaps, 0.5), percentile(baseline.gaps, 0.5)),
                _ratio(percentile(target.gaps, 0.99), percentile(baseline.gaps, 0.99)),
                _ratio(target.rate, baseline.rate),
                _ratio(target.concurrency, baseline.concurrency),
            ]
        ],
    )
    print(f"\nCPU while streaming (the machine has {cores} cores):")
    cpu_rows = []
    for m in configs:
        total = sum(m.cpu_s.values())
        cpu_rows.append(
            [
                m.concurrency,
                *(m.cpu_s[name] * 1e6 / m.chunks for name in PROCESSES),
                total * 1e6 / m.chunks,
                f"{total / (m.elapsed_s * cores):.0%}",
                cores * 1e6 / (total * 1e6 / m.chunks),
            ]
        )
    print_table(
        [
            "concurrent", *(f"{name} µs/delta" for name in PROCESSES), "all µs/delta", "cores busy",
            "deltas/s the cores allow",
        ],
        cpu_rows,
    )  # fmt: skip
    print(
        f"cores busy: every process's CPU / ({cores} cores x wall time); near 100% the machine is the "
        f"limit. Floor ({floor.concurrency} request): TTFC p50 {percentile(floor.ttfc, 0.5):.1f} ms."
    )


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


if __name__ == "__main__":
    main(sys.argv[1:])
