"""Time to first chunk and p99 between chunks of streamed replies through the model handler.

Client (``request_stream``) -> redis-server -> a worker process running streamqueue.handlers.openai ->
an OpenAI-compatible server, and back through the user's reply stream. Two servers, printed apart:

- stub: an aiohttp server in its own process that streams 20 deltas 20 ms apart in OpenAI's exact
  SSE format (50 tokens/s per reply, like a real GPU server), at 1,000 concurrent requests (issue 13).
  This measures the queue's own cost: TTFC floor = the stub's first delta, inter-chunk floor = 20 ms.
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
from pathlib import Path

from aiohttp import web
from streamqueue import Client
from streamqueue_harness.modelserver import ModelServer, llama_python, stream_completion
from streamqueue_harness.ports import free_port
from streamqueue_harness.processes import spawn, stop_groups
from streamqueue_harness.redis_server import RedisServer

from bench.common import print_table

STUB_WORDS = 20
STUB_INTERVAL_S = 0.02


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _run(
    redis_url: str, concurrency: int, rounds: int, chunk_timeout: float
) -> tuple[list[float], list[float], float]:
    """``concurrency`` users each stream ``rounds`` requests one after another; TTFC and gaps in ms."""
    ttfc: list[float] = []
    gaps: list[float] = []
    async with Client(redis_url, max_readers=concurrency + 10) as client:
        await client.request("warmup", "hi", timeout=120)  # the worker is up and the model loaded

        async def user(u: int) -> None:
            for _ in range(rounds):
                start = last = time.perf_counter()
                first = True
                async for _chunk in client.request_stream(f"u{u}", "tell me a story", timeout=chunk_timeout):
                    now = time.perf_counter()
                    (ttfc if first else gaps).append((now - (start if first else last)) * 1000)
                    first, last = False, now

        t0 = time.perf_counter()
        await asyncio.gather(*(user(u) for u in range(concurrency)))
        return ttfc, gaps, time.perf_counter() - t0


def _worker(
    redis_url: str, base_url: str, concurrency: int, max_tokens: int, log: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "STREAMQUEUE_REDIS_URL": redis_url,
        "STREAMQUEUE_HANDLER": "streamqueue.handlers.openai:handle",
        "STREAMQUEUE_OPENAI_BASE_URL": base_url,
        "STREAMQUEUE_OPENAI_MODEL": "tiny",
        "STREAMQUEUE_CONCURRENCY": str(concurrency),
        "STREAMQUEUE_BATCH_SIZE": "200",
        "STREAMQUEUE_HEALTH_PORT": "0",
        "STREAMQUEUE_CONSUMER": "bench",
    }
    if max_tokens:
        env["STREAMQUEUE_OPENAI_MAX_TOKENS"] = str(max_tokens)
    return spawn([sys.executable, "-m", "streamqueue.worker"], log=log, env=env)


def _measure(
    label: str, base_url: str, concurrency: int, rounds: int, max_tokens: int, workdir: Path
) -> list[object]:
    with RedisServer() as redis:
        worker = _worker(redis.url, base_url, concurrency, max_tokens, workdir / f"worker-{label}.log")
        try:
            ttfc, gaps, elapsed = asyncio.run(_run(redis.url, concurrency, rounds, chunk_timeout=300))
        finally:
            stop_groups([(worker.pid, worker)], grace=10)
    return [
        label, concurrency, len(ttfc), _pct(ttfc, 0.5), _pct(ttfc, 0.99), _pct(gaps, 0.5), _pct(gaps, 0.99),
        (len(gaps) + len(ttfc)) / elapsed,
    ]  # fmt: skip


def _serve_stub(port: int) -> None:
    """The stub server process (``--stub-server PORT``)."""

    async def respond(request: web.Request) -> web.StreamResponse:
        await request.read()
        return await stream_completion(request, [f"w{i} " for i in range(STUB_WORDS)], STUB_INTERVAL_S)

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
    parser.add_argument("--llama-concurrency", type=int, default=4)
    parser.add_argument("--stub-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stub_server:
        _serve_stub(args.stub_server)
        return
    workdir = Path(tempfile.mkdtemp(prefix="sq-bench-model-"))
    rows = []
    port = free_port()
    stub = spawn(
        [sys.executable, "-m", "bench.model_stream", "--stub-server", str(port)], log=workdir / "stub.log"
    )
    try:
        label = f"stub ({STUB_WORDS} deltas, {STUB_INTERVAL_S * 1000:.0f} ms apart)"
        rows.append(_measure(label, f"http://127.0.0.1:{port}/v1", args.concurrency, 1, 0, workdir))
    finally:
        stop_groups([(stub.pid, stub)], grace=5)
    python = llama_python()
    if python is None:
        print("llama: skipped, no llama-cpp-python venv (run `bash hack/llama.sh`)")
    else:
        with ModelServer(python, workdir=workdir / "llama") as llama:
            label = "llama-cpp-python, tiny model (16 tokens)"
            rows.append(_measure(label, llama.base_url, args.llama_concurrency, 2, 16, workdir))
    print_table(
        [
            "server",
            "concurrent",
            "replies",
            "TTFC p50 ms",
            "TTFC p99 ms",
            "gap p50 ms",
            "gap p99 ms",
            "chunks/s",
        ],
        rows,
    )
    print("TTFC: request sent -> first chunk at the client; gap: between successive chunks of one reply.")


if __name__ == "__main__":
    main(sys.argv[1:])
