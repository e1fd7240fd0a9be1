"""Model-API limits shared by every worker of a queue (``streamqueue.limits``), against a real HTTP stub
that enforces limits the way a provider does and answers 429 with Retry-After when they are broken.

Workers are real ``python -m streamqueue.worker`` processes (each with its own Redis client and
clock) or handlers with their own Redis clients; the stub runs in the test's event loop on loopback
and records what it saw: when each request arrived, how many ran at once, and every 429 it sent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from aiohttp import web
from streamqueue import wire
from streamqueue.connection import RedisConnection, connect, connect_any
from streamqueue.handlers import Message, close_handler, load_handler
from streamqueue.handlers.openai import OpenAIHandler
from streamqueue.limits import CONCURRENCY_POLL_MS, LimitsUnavailable, ModelLimits, request_burst
from streamqueue.metrics import WorkerMetrics
from streamqueue.settings import WorkerSettings
from streamqueue_harness.eventually import eventually, eventually_async
from streamqueue_harness.modelserver import completion_chunk
from streamqueue_harness.processes import spawn, stop_groups

from tests.worker.conftest import STREAM, answered_request_ids, replies, send

MODEL_HANDLER = "streamqueue.handlers.openai:handle"
BOUND = wire.limit_bound_key(STREAM)


@dataclass
class LimitedModel:
    """An OpenAI-style chat endpoint that enforces limits like a provider and records what it saw.

    ``per_second``: a token bucket of that rate holding ``burst`` requests (providers measure RPM
    over short windows with some tolerance: a bucket of 1 would refuse a well-spaced client for a
    millisecond of network jitter). ``concurrent``: more requests in progress at once get a 429.
    """

    per_second: float | None = None
    burst: float = 2
    concurrent: int | None = None
    retry_after: str = "1"
    words: tuple[str, ...] = ("Hel", "lo", "!")
    interval_s: float = 0.0
    usage_tokens: int | None = None  # sent in the final usage event, as include_usage asks
    refuse_once_at: int | None = None  # the n-th request (1-based) gets a 429 whatever the limits
    arrivals: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)
    running: int = 0
    max_running: int = 0
    _level: float = 0.0
    _at: float = 0.0

    def __post_init__(self) -> None:
        self._level, self._at = self.burst, time.monotonic()

    def _rate_allows(self, now: float) -> bool:
        if self.per_second is None:
            return True
        self._level = min(self.burst, self._level + (now - self._at) * self.per_second)
        self._at = now
        if self._level < 1:
            return False
        self._level -= 1
        return True

    async def respond(self, request: web.Request) -> web.StreamResponse:
        now = time.monotonic()
        self.arrivals.append(now)
        self.bodies.append(await request.json())
        too_many = self.concurrent is not None and self.running >= self.concurrent
        if len(self.arrivals) == self.refuse_once_at or too_many or not self._rate_allows(now):
            self.refused.append(now)
            body = {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}}
            return web.json_response(body, status=429, headers={"Retry-After": self.retry_after})
        self.accepted.append(now)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            return await self._stream(request)
        finally:
            self.running -= 1

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(completion_chunk(None, role=True))
        for i, word in enumerate(self.words):
            if i and self.interval_s:
                await asyncio.sleep(self.interval_s)
            await response.write(completion_chunk(word))
        await response.write(completion_chunk(None, finish_reason="stop"))
        if self.usage_tokens is not None:  # OpenAI's last event under stream_options.include_usage
            usage = {"prompt_tokens": 1, "completion_tokens": self.usage_tokens - 1}
            event = {"choices": [], "usage": {**usage, "total_tokens": self.usage_tokens}}
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def rate(self) -> float:
        """Accepted requests per second, first to last."""
        return (len(self.accepted) - 1) / (self.accepted[-1] - self.accepted[0])


@pytest.fixture
def model(stub) -> Callable[..., Awaitable[tuple[LimitedModel, str]]]:
    """``await model(**limits)`` → (LimitedModel, its base URL); the stub servers stop at teardown."""

    async def start(**kwargs) -> tuple[LimitedModel, str]:
        limited = LimitedModel(**kwargs)
        return limited, (await stub(limited.respond)).base_url

    return start


async def model_workers(worker_processes, r: redis.Redis, base_url: str, count: int = 2, **env: str) -> None:
    """Start ``count`` worker processes with the model handler; return once each has started."""
    names = [f"w{i}" for i in range(count)]
    for name in names:
        worker_processes.start(
            name, handler=MODEL_HANDLER, openai_base_url=base_url, claim_idle_ms="60000", **env
        )

    def started() -> bool:
        return all(f"worker {name} starting" in worker_processes.log_of(name) for name in names)

    await eventually_async(started, f"{count} workers started", timeout=20)


def answered(r: redis.Redis, users: list[str]) -> int:
    return len(set(answered_request_ids(r, users)))


def send_many(r: redis.Redis, count: int) -> list[str]:
    users = [f"u{i % 10}" for i in range(count)]
    for i, user in enumerate(users):
        send(r, user, f"question {i}", request_id=f"q{i}")
    return sorted(set(users))


# --- (a) requests per minute over two worker processes ------------------------------------------


async def test_two_workers_share_a_requests_per_minute_limit(model, worker_processes, raw) -> None:
    """At the stub's own rate (600/min) two workers get no 429 and use the rate; unlimited, they get 429s."""
    stub, url = await model(per_second=10)
    await model_workers(worker_processes, raw, url, model_requests_per_minute="600")
    users = send_many(raw, 40)
    await eventually_async(lambda: answered(raw, users) == 40, "40 answers", timeout=30)
    assert stub.refused == [], f"{len(stub.refused)} requests refused with 429"
    assert len(stub.accepted) == 40
    assert 8.5 <= stub.rate() <= 10.5, f"{stub.rate():.2f} requests/s for a limit of 10/s"
    print(f"limited: 0 x 429, {stub.rate():.2f} requests/s for a limit of 10/s")

    for proc in worker_processes.procs:
        proc.send_signal(signal.SIGTERM)
    for proc in worker_processes.procs:
        assert proc.wait(timeout=20) == 0
    unlimited, url = await model(per_second=10)
    await model_workers(worker_processes, raw, url)  # the same load, no limit set
    send_many(raw, 40)
    await eventually_async(lambda: len(unlimited.refused) > 0, "429s from the stub", timeout=20)
    print(f"unlimited: {len(unlimited.refused)} x 429 among the first {len(unlimited.arrivals)} requests")


# --- (b) a 429 pauses every worker --------------------------------------------------------------


async def test_a_429_pauses_every_worker_for_its_retry_after(model, worker_processes, raw) -> None:
    """One 429 (Retry-After: 2) to one worker: no request reaches the stub from any worker for 2 s."""
    stub, url = await model(refuse_once_at=6, retry_after="2", words=("a", "b", "c"), interval_s=0.02)
    await model_workers(worker_processes, raw, url, concurrency="2")
    users = send_many(raw, 40)
    await eventually_async(lambda: answered(raw, users) == 40, "40 answers", timeout=30)
    [refused_at] = stub.refused
    during = [t - refused_at for t in stub.arrivals if refused_at + 0.1 <= t < refused_at + 2.0]
    assert during == [], f"requests {during} s after the 429, while the queue was paused"
    after = [t for t in stub.arrivals if t >= refused_at + 2.0]
    assert after, "nothing was sent after the pause"
    # Both workers were busy around the pause, so both had to hold back (not only the refused one).
    served_by = {f[wire.WORKER_ID] for u in users for f in replies(raw, u) if wire.RESPONSE in f}
    assert served_by == {"w0", "w1"}
    in_flight = [round(t - refused_at, 3) for t in stub.arrivals if refused_at < t < refused_at + 0.1]
    print(f"requests already granted when the 429 came (sent <0.1 s after it): {in_flight}")


async def test_the_http_handler_obeys_the_same_limits(model, worker_processes, raw) -> None:
    """The HTTP handler's calls: the shared RPM (no 429 from the stub's own rate) and a 429's pause."""
    stub, url = await model(per_second=10, refuse_once_at=5, retry_after="1")
    for name in ("w0", "w1"):
        env = {"model_requests_per_minute": "600", "claim_idle_ms": "60000"}
        worker_processes.start(name, handler_url=f"{url}/chat/completions", **env)
    users = send_many(raw, 30)
    await eventually_async(lambda: answered(raw, users) == 30, "30 answers", timeout=30)
    [refused_at] = stub.refused  # the forced one: the limit itself kept to the stub's rate
    during = [t - refused_at for t in stub.arrivals if refused_at + 0.1 <= t < refused_at + 1.0]
    assert during == [], f"requests {during} s after the 429, while the queue was paused"
    assert len(stub.accepted) == 30


# --- (c) concurrent calls --------------------------------------------------------------------------


async def test_two_workers_share_a_concurrent_calls_limit(model, worker_processes, raw) -> None:
    stub, url = await model(concurrent=3, words=tuple("abcdef"), interval_s=0.05)
    # Each worker alone could run 3 at once (its connection pool: model_concurrent_calls): together 6.
    await model_workers(
        worker_processes, raw, url, model_concurrent_calls="3", concurrency="3", batch_size="3"
    )
    users = send_many(raw, 24)
    await eventually_async(lambda: answered(raw, users) == 24, "24 answers", timeout=30)
    assert stub.refused == [], f"{len(stub.refused)} requests refused with 429"
    assert stub.max_running == 3, f"at most {stub.max_running} at once for a limit of 3"
    served_by = {f[wire.WORKER_ID] for u in users for f in replies(raw, u) if wire.RESPONSE in f}
    assert served_by == {"w0", "w1"}


_HOLDER = """
import asyncio, sys
from streamqueue.connection import RedisConnection, connect
from streamqueue.limits import ModelLimits

async def main() -> None:
    limits = ModelLimits(connect(RedisConnection(url=sys.argv[1])), sys.argv[2], concurrent_calls=1,
                         lease_ms=int(sys.argv[3]))
    async with limits.call():
        print("holding", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.fixture
def holder(redis_server, tmp_path) -> Iterator[Callable[[int], object]]:
    """A process that takes the queue's only call slot and holds it (renewing its lease) until killed."""
    procs = []

    def start(lease_ms: int):
        log = tmp_path / "holder.log"
        proc = spawn([sys.executable, "-c", _HOLDER, redis_server.url, STREAM, str(lease_ms)], log=log)
        procs.append(proc)
        eventually(lambda: "holding" in log.read_text(), "the holder's call", timeout=15)
        return proc

    yield start
    stop_groups([(p.pid, p) for p in procs], grace=1)


async def test_a_crashed_workers_call_slot_frees_after_its_lease(holder, redis_server) -> None:
    lease_ms = 1000
    proc = holder(lease_ms)
    limits = ModelLimits(connect(RedisConnection(url=redis_server.url)), STREAM, concurrent_calls=1,
                         owns_redis=True)  # fmt: skip
    try:
        waiting = asyncio.create_task(limits.call().__aenter__())
        done, _ = await asyncio.wait([waiting], timeout=2.5 * lease_ms / 1000)
        assert not done, "the slot freed although its holder lives and renews its lease"
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        call = await asyncio.wait_for(waiting, timeout=lease_ms / 1000 + 1)
        freed_after = time.monotonic() - killed
        assert freed_after <= lease_ms / 1000 + 3 * CONCURRENCY_POLL_MS / 1000 + 0.2
        await call.__aexit__(None, None, None)
    finally:
        await limits.aclose()


# --- (d) tokens per minute -------------------------------------------------------------------------


@pytest.fixture
async def limited_handlers(redis_server) -> AsyncIterator[Callable[..., OpenAIHandler]]:
    """Model handlers, each with its own ModelLimits on its own Redis client (as two workers have)."""
    built: list[OpenAIHandler] = []

    def build(base_url: str, **limits: Any) -> OpenAIHandler:
        redis_client = connect(RedisConnection(url=redis_server.url))
        own = ModelLimits(redis_client, STREAM, owns_redis=True, **limits)
        built.append(OpenAIHandler(base_url, retries=0, limits=own))
        return built[-1]

    yield build
    for handler in built:
        await close_handler(handler)


async def call_for(handler: OpenAIHandler, seconds: float) -> int:
    """Call the model back to back for ``seconds``; returns the calls that started."""
    deadline, calls = time.monotonic() + seconds, 0
    message = Message(id="1-0", stream=STREAM, user_id="u", message="hi", request_id="r", deliveries=1)
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(_drain(handler(message)), deadline - time.monotonic())
        except TimeoutError:
            break
        calls += 1
    return calls


async def _drain(chunks: AsyncIterator[str]) -> None:
    async for _ in chunks:
        pass


async def test_tokens_reported_in_usage_are_debited_and_the_rate_holds(model, limited_handlers, raw) -> None:
    """6,000 tokens/min (a full bucket: 6,000) and 1,000 tokens per call: 6 calls, then one per 10 s."""
    tpm, per_call = 6000, 1000
    stub, url = await model(usage_tokens=per_call)
    two = [limited_handlers(url, tokens_per_minute=tpm) for _ in range(2)]
    started = time.monotonic()
    await asyncio.gather(*(call_for(h, 2.0) for h in two))
    elapsed = time.monotonic() - started
    budget = tpm + tpm / 60 * elapsed  # the full bucket plus what refilled meanwhile
    # A call starts while the budget is positive, before its tokens are known: at most one per worker
    # beyond the budget.
    assert len(stub.accepted) * per_call <= budget + len(two) * per_call
    assert len(stub.accepted) >= tpm // per_call
    assert stub.bodies[0]["stream_options"] == {"include_usage": True}
    assert raw.get(BOUND) == wire.LIMIT_TOKENS
    assert float(raw.hget(wire.limits_key(STREAM), "tpm_level")) < 0  # in debt: later calls wait
    print(f"tokens: {len(stub.accepted)} calls x {per_call} in {elapsed:.1f}s for a budget of {budget:.0f}")


async def test_without_usage_the_handler_estimates_the_tokens(model, limited_handlers, raw) -> None:
    """No usage event: a quarter of the prompt's characters plus one per chunk ("hi": 1 + 3 chunks)."""
    _, url = await model(usage_tokens=None)
    [handler] = [limited_handlers(url, tokens_per_minute=6000)]
    calls = await call_for(handler, 0.3)
    level = float(raw.hget(wire.limits_key(STREAM), "tpm_level"))
    refilled = 6000 / 60 * 0.3  # at most, and never above the full bucket
    assert 6000 - 4 * calls <= level <= 6000 - 4 * calls + refilled, (calls, level)


# --- (e) limit_bound_key: the operator's signal ----------------------------------------------------


async def test_the_bound_key_names_the_limit_while_calls_wait_and_then_expires(redis_server, raw) -> None:
    assert request_burst(60) == 1 and request_burst(60_000) == 10
    metrics = WorkerMetrics()
    limits = ModelLimits(connect(RedisConnection(url=redis_server.url)), STREAM, requests_per_minute=60,
                         metrics=metrics, owns_redis=True)  # fmt: skip
    try:
        assert raw.get(BOUND) is None  # no call has waited yet
        await limits.pause(0.3)  # as a handler does on a 429
        assert raw.get(BOUND) == wire.LIMIT_RETRY_AFTER
        assert 0 < raw.pttl(BOUND) <= wire.LIMIT_BOUND_TTL_MS
        await asyncio.wait_for(_enter_and_leave(limits), timeout=2)

        second = asyncio.create_task(_enter_and_leave(limits))  # 60/min: a second call waits 1 s
        await eventually_async(lambda: raw.get(BOUND) == wire.LIMIT_REQUESTS, "RequestsPerMinute", timeout=2)
        assert 0 < raw.pttl(BOUND) <= wire.LIMIT_BOUND_TTL_MS
        await asyncio.wait_for(second, timeout=2)

        def sample(name: str, labels: dict[str, str] | None = None) -> float:
            return metrics.registry.get_sample_value(name, labels) or 0.0

        assert sample("streamqueue_model_limit_pauses_total") == 1
        assert sample("streamqueue_model_limit_wait_seconds_total", {"limit": wire.LIMIT_RETRY_AFTER}) > 0.25
        assert sample("streamqueue_model_limit_wait_seconds_total", {"limit": wire.LIMIT_REQUESTS}) > 0.9

        # No call waits any more: nothing refreshes the key, it runs out LIMIT_BOUND_TTL_MS after the
        # last wait (the operator then sees the queue as free to scale).
        first = raw.pttl(BOUND)
        await asyncio.sleep(0.3)
        assert 0 < raw.pttl(BOUND) <= first - 250
    finally:
        await limits.aclose()


async def _enter_and_leave(limits: ModelLimits) -> None:
    async with limits.call():
        pass


async def test_redis_unreachable_fails_the_call_instead_of_calling_unlimited(redis_server) -> None:
    connection = RedisConnection(url=redis_server.url)
    limits = ModelLimits(connect(connection), STREAM, requests_per_minute=60, owns_redis=True)
    try:
        async with limits.call():
            pass
        redis_server.stop()
        with pytest.raises(LimitsUnavailable, match="the call is not made"):
            async with limits.call():
                raise AssertionError("a call started without its limits")
    finally:
        await limits.aclose()


# --- on a Redis Cluster: one script, the queue's keys in one slot ----------------------------------


async def test_limits_on_a_redis_cluster(redis_cluster) -> None:
    connection = RedisConnection(url=redis_cluster.url, cluster=True)
    two = [ModelLimits(connect_any(connection), "cq", requests_per_minute=600, owns_redis=True) for _ in "ab"]
    try:
        started: list[float] = []

        async def one(limits: ModelLimits) -> None:
            async with limits.call():
                started.append(time.monotonic())

        await asyncio.gather(*(one(two[i % 2]) for i in range(8)))
        started.sort()
        gaps = [b - a for a, b in itertools.pairwise(started)]
        assert min(gaps) >= 0.09, gaps  # 600/min over both: one call per 100 ms
        await two[0].pause(0.2)
        before = time.monotonic()
        await one(two[1])
        assert time.monotonic() - before >= 0.18
    finally:
        for limits in two:
            await limits.aclose()


# --- (f) the real model server with limits on ------------------------------------------------------


async def test_real_llama_server_with_every_limit_on(llama, settings, workers, raw) -> None:
    """llama-cpp-python accepts stream_options but sends no usage: the estimate is what counts."""
    tpm = 60  # one token a second: what refills during the test stays small
    s = settings(
        handler=MODEL_HANDLER,
        openai_base_url=llama.base_url,
        openai_model="tiny",
        openai_max_tokens=8,
        model_requests_per_minute=600,
        model_tokens_per_minute=tpm,
        model_concurrent_calls=2,
        chunk_flush_ms=0,  # an entry per streamed chunk: the estimate below counts them
    )
    metrics = WorkerMetrics()
    handler = load_handler(MODEL_HANDLER, s, metrics=metrics)
    assert isinstance(handler, OpenAIHandler) and handler.limits is not None
    assert handler.limits.metrics is metrics  # the worker's registry counts the waits
    try:
        await workers.start(s, handler=handler)
        started = time.monotonic()
        users = send_many(raw, 6)
        await eventually_async(lambda: answered(raw, users) == 6, "6 answers from llama", timeout=60)
        elapsed = time.monotonic() - started
        chunks = sum(1 for u in users for f in replies(raw, u) if wire.CHUNK in f and wire.RESPONSE not in f)
        estimate = 6 * 3 + chunks  # "question <i>": 10 characters, 3 tokens; one per chunk
        spent = tpm - float(raw.hget(wire.limits_key(STREAM), "tpm_level"))
        assert estimate - tpm / 60 * elapsed <= spent <= estimate, (spent, estimate, elapsed)
        assert raw.zcard(wire.limit_calls_key(STREAM)) == 0  # every call gave its slot back
    finally:
        await close_handler(handler)


async def test_settings_build_limits_and_size_the_connection_pool() -> None:
    s = WorkerSettings(openai_base_url="http://127.0.0.1:1/v1", model_concurrent_calls=7, concurrency=50)
    handler = load_handler(MODEL_HANDLER, s)
    unset = load_handler(
        MODEL_HANDLER, WorkerSettings(openai_base_url="http://127.0.0.1:1/v1", concurrency=50)
    )
    try:
        assert isinstance(handler, OpenAIHandler) and handler.limits is not None
        assert (handler.limits.rpm, handler.limits.tpm, handler.limits.concurrent) == (0, 0, 7)
        assert handler.pool.connections == 7
        # No limit set: still a ModelLimits, so a 429 pauses the whole queue.
        assert isinstance(unset, OpenAIHandler) and unset.limits is not None and not unset.limits.limited
        assert unset.pool.connections == 50
    finally:
        await close_handler(handler)
        await close_handler(unset)
