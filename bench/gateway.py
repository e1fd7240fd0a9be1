"""What the gateway adds to time to first token at 200 concurrent streams, and tokens/s per gateway core.

One redis-server, one worker process streaming numbered tokens (``streamqueue_harness.token_handler``:
the first at once, then one every ``--intervals-ms``, 20 a reply), one ``streamqueue-gateway``
process in front of the queue with an API key per user, and quotas and a backlog threshold set far
above the load, so each request pays for auth, the quota scripts and the backlog check
(``--no-quotas``: an unlimited tier, which asks Redis nothing). A request the gateway refuses anyway
is counted and shown with its error, not timed. ``--concurrency`` users (200) each stream
``--rounds`` replies one after another, their starts spread evenly over one reply's length, so that
many streams are open at once and requests arrive at a steady rate (all starting together would
measure a burst's queue instead). Rounds alternate between:

- direct: the project's ``streamqueue.Client`` (``request_stream``) in this process, the baseline;
- gateway: ``POST /v1/chat/completions`` with ``stream: true`` over HTTP from this process (aiohttp),
  reading the OpenAI SSE chunks.

TTFT is request start -> first token text at the caller. Added = gateway minus direct, quantile by
quantile, pooled over ``--repeats``; target (issue 22): <= 2 ms p50, <= 10 ms p99. Tokens/s per core:
the tokens delivered through the gateway / the CPU seconds the gateway process spent meanwhile
(``/proc/<pid>/stat``), i.e. what one core running the gateway flat out would carry; beside it, the
CPU this process spent per token reading directly (the ``Client`` any reader pays for). Each token
pace is a load: 20 ms (50 tokens/s a stream, a GPU server's pace, as in ``bench.model_stream``)
offers 200 x 50 = 10,000 tokens/s. Every process (this one, the gateway, the worker, redis-server)
shares the machine's cores.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml
from streamqueue import Client, wire
from streamqueue_gateway.auth import hash_key
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.ports import free_port
from streamqueue_harness.processes import spawn, stop_groups
from streamqueue_harness.redis_server import RedisServer
from streamqueue_harness.workerproc import spawn_worker

from bench.common import percentile, print_table, process_cpu_seconds

STREAM = "gateway_bench"
MODEL = "stub"
TOKENS = 20
GATEWAY = Path(sys.executable).with_name("streamqueue-gateway")
# Limits on but never reached: each request pays for the quota and backlog checks, none is refused.
LIMITS = {
    "maxRequests": 10_000,
    "tokensPerMinute": 10**9,
    "tierMaxRequests": 100_000,
    "tierTokensPerMinute": 10**10,
}


@dataclass
class Measured:
    """One contender at one pace, pooled over its rounds: TTFT (ms), tokens, wall time and the CPU
    seconds of the process that did the contender's reading (this one, or the gateway)."""

    label: str
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    refused: dict[str, int] = field(default_factory=dict)  # the gateway's error answers, by status and code

    def row(self, interval_ms: int) -> list[object]:
        q = [f"{percentile(self.ttft, p):.2f}" for p in (0.5, 0.9, 0.99)]
        rate, refused = self.tokens / self.elapsed_s, sum(self.refused.values())
        return [
            f"{interval_ms} ms",
            self.label,
            len(self.ttft),
            refused,
            *q,
            rate,
            self.cpu_s * 1e6 / self.tokens,
        ]


@dataclass
class Load:
    """What one round asks for: ``users`` streams of replies with a token every ``interval_ms``."""

    users: int
    rounds: int
    interval_ms: int

    @property
    def message(self) -> str:
        return f"tokens={TOKENS} interval_ms={self.interval_ms}"


def api_key(user: int) -> str:
    return f"sq-bench-key-{user}"


def write_config(workdir: Path, redis_url: str, users: int, quotas: bool) -> Path:
    """The gateway's config file and the API keys file it names (a hash per user, as a Secret holds)."""
    keys = [{"sha256": hash_key(api_key(u)), "user": f"u{u}", "tier": "free"} for u in range(users)]
    (workdir / "keys.json").write_text(json.dumps(keys))
    config = {
        "redis": {"url": redis_url},
        "models": [{"name": MODEL, "stream": STREAM, "partitions": 1, "maxBacklog": 1_000_000}],
        "auth": {"apiKeysFile": str(workdir / "keys.json"), "defaultTier": "free"},
        "tiers": {"free": LIMITS if quotas else {}},  # {}: unlimited, the quotas ask Redis nothing
        "requestTimeoutSeconds": 60,
    }
    (workdir / "gateway.yaml").write_text(yaml.safe_dump(config))
    return workdir / "gateway.yaml"


async def _streams(
    load: Load, one: Callable[[int], Awaitable[tuple[float, int] | str]], into: Measured
) -> None:
    """``load.users`` tasks, each ``load.rounds`` replies in turn, their first starts spread over one
    reply's length; ``one(user)`` -> (TTFT ms, tokens), or why the request was refused."""
    spread_s = TOKENS * load.interval_ms / 1000

    async def user(u: int) -> None:
        await asyncio.sleep(u * spread_s / load.users)  # pacing the open-loop start, not a sync point
        for _ in range(load.rounds):
            result = await one(u)
            if isinstance(result, str):
                into.refused[result] = into.refused.get(result, 0) + 1
                continue
            into.ttft.append(result[0])
            into.tokens += result[1]

    t0 = time.perf_counter()
    await asyncio.gather(*(user(u) for u in range(load.users)))
    into.elapsed_s += time.perf_counter() - t0


async def direct(client: Client, load: Load, into: Measured) -> None:
    async def one(u: int) -> tuple[float, int]:
        start = time.perf_counter()
        ttft, text = 0.0, []
        async for chunk in client.request_stream(f"u{u}", load.message, timeout=60):
            ttft = ttft or (time.perf_counter() - start) * 1000
            text.append(chunk)
        return ttft, len("".join(text).split())

    before = time.process_time()
    await _streams(load, one, into)
    into.cpu_s += time.process_time() - before


async def via_gateway(http: aiohttp.ClientSession, base: str, pid: int, load: Load, into: Measured) -> None:
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": load.message}]}

    async def one(u: int) -> tuple[float, int] | str:
        start = time.perf_counter()
        ttft, text = 0.0, []
        headers = {"Authorization": f"Bearer {api_key(u)}"}
        async with http.post(f"{base}/v1/chat/completions", json=body, headers=headers) as response:
            if response.status != 200:  # counted and shown: a refusal has no first token to time
                error = (await response.json())["error"]
                return f"{response.status} {error['code']}: {error['message']}"
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                choices = json.loads(line[6:])["choices"]
                content = choices[0].get("delta", {}).get("content") if choices else None
                if content:
                    ttft = ttft or (time.perf_counter() - start) * 1000
                    text.append(content)
        return ttft, len("".join(text).split())

    before = process_cpu_seconds(pid)
    await _streams(load, one, into)
    into.cpu_s += process_cpu_seconds(pid) - before


def start_gateway(config: Path, port: int, log: Path, profile: Path | None) -> subprocess.Popen[bytes]:
    """The gateway as its console script runs it, in a process of its own (its CPU is measured); with
    ``profile``, under cProfile, which writes its stats there when SIGTERM ends the server."""
    command = [str(GATEWAY)]
    if profile is not None:
        command = [sys.executable, "-m", "cProfile", "-o", str(profile), *command]
    return spawn([*command, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)], log=log)


async def wait_ready(http: aiohttp.ClientSession, base: str, gateway_log: Path) -> None:
    async def ready() -> bool:
        try:
            async with http.get(f"{base}/readyz") as response:
                return response.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await eventually_async(ready, f"the gateway's /readyz (log: {gateway_log})", 60, 0.1, RuntimeError)


async def run(args: argparse.Namespace, workdir: Path) -> list[tuple[int, Measured, Measured]]:
    """Per pace: (interval ms, direct, gateway)."""
    results = [(ms, Measured("direct Client"), Measured("gateway")) for ms in args.intervals_ms]
    with RedisServer() as redis:
        redis.client().xgroup_create(STREAM, wire.DEFAULT_GROUP, id="0", mkstream=True)
        worker = spawn_worker(
            redis.url, "bench", workdir / "worker.log", stream=STREAM,
            handler="streamqueue_harness.token_handler:handle", concurrency=str(2 * args.concurrency),
            batch_size="200",
        )  # fmt: skip
        port = free_port()
        config = write_config(workdir, redis.url, args.concurrency, args.quotas)
        gateway = start_gateway(config, port, workdir / "gateway.log", args.profile)
        base = f"http://127.0.0.1:{port}"
        try:
            async with (
                Client(redis.url, stream=STREAM, max_readers=args.concurrency + 10) as client,
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
                ) as http,
            ):
                await wait_ready(http, base, workdir / "gateway.log")
                load_average = os.getloadavg()[0]
                print(f"gateway pid {gateway.pid}, worker pid {worker.pid}; load average {load_average:.2f}")
                warm_up = Load(args.concurrency, 1, args.intervals_ms[0])
                await direct(client, warm_up, Measured("warm-up"))
                await via_gateway(http, base, gateway.pid, warm_up, Measured("warm-up"))
                for repeat in range(args.repeats):
                    for ms, base_measure, gateway_measure in results:
                        print(f"repeat {repeat + 1}/{args.repeats}, a token every {ms} ms ...", flush=True)
                        load = Load(args.concurrency, args.rounds, ms)
                        await direct(client, load, base_measure)
                        await via_gateway(http, base, gateway.pid, load, gateway_measure)
        finally:
            stop_groups([(gateway.pid, gateway), (worker.pid, worker)], grace=10)
    return results


def report(results: list[tuple[int, Measured, Measured]], concurrency: int) -> None:
    print()
    headers = [
        "token every",
        "path",
        "streams",
        "refused",
        "TTFT p50",
        "p90 ms",
        "p99 ms",
        "tokens/s",
        "CPU µs/tok",
    ]
    print_table(headers, [m.row(ms) for ms, *pair in results for m in pair])
    print(f"\nat {concurrency} concurrent streams (CPU: direct = this process, gateway = the gateway's)")
    for ms, base, gateway in results:
        for why, count in gateway.refused.items():
            print(f"  token every {ms} ms: {count} gateway requests refused: {why}")
        p50, p99 = (percentile(gateway.ttft, p) - percentile(base.ttft, p) for p in (0.5, 0.99))
        verdict = "met" if p50 <= 2 and p99 <= 10 else "NOT met"
        print(
            f"  token every {ms} ms: the gateway adds p50 {p50:+.2f} ms, p99 {p99:+.2f} ms to TTFT "
            f"(target <= 2 / <= 10 ms: {verdict}); "
            f"{gateway.tokens / max(gateway.cpu_s, 1e-9):,.0f} tokens/s per gateway core"
        )
    print(f"load average at the end {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=200, help="streams open at once")
    parser.add_argument(
        "--intervals-ms", type=lambda s: [int(v) for v in s.split(",")], default=[20, 100],
        help="token paces to measure, comma-separated (default 20,100)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="replies each stream reads in turn, per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="direct/gateway alternations")
    parser.add_argument(
        "--no-quotas", dest="quotas", action="store_false", help="an unlimited tier: no quota round trips"
    )
    parser.add_argument("--profile", type=Path, help="run the gateway under cProfile, its stats to this file")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="sq-bench-gateway-"))
    results = asyncio.run(asyncio.wait_for(run(args, workdir), 1800))
    report(results, args.concurrency)


if __name__ == "__main__":
    main(sys.argv[1:])
