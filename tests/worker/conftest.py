"""Fixtures for worker tests: article-style producers on a real redis-server, in-process Workers and
worker processes started the way the pod runner starts them (``python -m streamqueue.worker``, env only).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest
import redis
from aiohttp import web
from streamqueue import wire
from streamqueue.settings import WorkerSettings
from streamqueue.worker import Worker
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.workerproc import spawn_worker

STREAM = wire.DEFAULT_STREAM
GROUP = wire.DEFAULT_GROUP


@pytest.fixture
def raw(redis_server) -> redis.Redis:
    """A plain synchronous client: how the article's producers and readers talk to Redis."""
    return redis_server.client(decode_responses=True)


def send(
    r: redis.Redis, user_id: str | None, message: str, request_id: str | None = None, **extra: str
) -> str:
    """XADD a request the article's way (plus an optional request_id)."""
    fields = {wire.MESSAGE: message, wire.TIMESTAMP: str(time.time()), **extra}
    if user_id is not None:
        fields[wire.USER_ID] = user_id
    if request_id is not None:
        fields[wire.REQUEST_ID] = request_id
    return r.xadd(STREAM, fields)


def replies(r: redis.Redis, user_id: str) -> list[dict[str, str]]:
    return [fields for _, fields in r.xrange(wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, user_id))]


def answered_request_ids(r: redis.Redis, users: list[str]) -> list[str]:
    """Every request_id with a final reply, duplicates included."""
    return [f[wire.REQUEST_ID] for u in users for f in replies(r, u) if wire.RESPONSE in f]


def group_settled(r: redis.Redis) -> bool:
    """Nothing pending and nothing undelivered in the article's group."""
    try:
        [group] = [g for g in r.xinfo_groups(STREAM) if g["name"] == GROUP]
    except redis.ResponseError:
        return False
    return group["pending"] == 0 and group["lag"] == 0


def has_group(r: redis.Redis) -> bool:
    try:
        return any(g["name"] == GROUP for g in r.xinfo_groups(STREAM))
    except redis.ResponseError:
        return False


def acl_user(r: redis.Redis, name: str, *commands: str) -> dict[str, str]:
    """Create an ACL user allowed ``+@all`` and ``commands`` on every key; returns its settings overrides."""
    r.acl_setuser(name, enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", *commands])
    return {"redis_username": name, "redis_password": "pw"}


@pytest.fixture
def settings(redis_server) -> Callable[..., WorkerSettings]:
    """Worker settings for tests: short BLOCK and claim times, no health port."""

    def make(**overrides: Any) -> WorkerSettings:
        values: dict[str, Any] = {
            "redis_url": redis_server.url,
            "consumer": "w1",
            "block_ms": 100,
            "claim_idle_ms": 300,
            "health_port": 0,
            "shutdown_grace_seconds": 10,
        }
        return WorkerSettings(**{**values, **overrides})

    return make


class RunningWorkers:
    """In-process Workers started by a test; all stopped (and awaited) at teardown."""

    def __init__(self, r: redis.Redis) -> None:
        self._r = r
        self.running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(self, settings: WorkerSettings, handler: Any = None) -> Worker:
        worker = Worker(settings, handler=handler)
        self.running.append((worker, asyncio.create_task(worker.run())))
        await eventually_async(lambda: has_group(self._r), "the consumer group", timeout=15)
        return worker

    async def stop(self, worker: Worker, within: float = 20) -> None:
        [task] = [t for w, t in self.running if w is worker]
        worker.request_stop()
        await asyncio.wait_for(task, within)


@pytest.fixture
async def workers(raw) -> AsyncIterator[RunningWorkers]:
    running = RunningWorkers(raw)
    yield running
    for worker, _ in running.running:
        worker.request_stop()
    await asyncio.wait_for(asyncio.gather(*(t for _, t in running.running)), timeout=30)


class WorkerProcesses:
    """``python -m streamqueue.worker`` children configured by env only, as the pod runner does."""

    def __init__(self, redis_url: str, logs: Path) -> None:
        self.redis_url = redis_url
        self.logs = logs
        self.procs: list[Popen[bytes]] = []

    def start(self, consumer: str, **settings: str) -> Popen[bytes]:
        """One worker; ``settings`` as ``WorkerSettings`` names them (``claim_idle_ms="300"``)."""
        settings = {"block_ms": "200", **settings}
        proc = spawn_worker(self.redis_url, consumer, self.logs / f"{consumer}.log", **settings)
        self.procs.append(proc)
        return proc

    def log_of(self, consumer: str) -> str:
        return (self.logs / f"{consumer}.log").read_text()


class Attempts:
    """Numbers the requests a web handler answers, for retry tests: ``respond(request, attempt)`` gets
    1, 2, ...; serve ``handler``; ``calls`` is how many attempts the client under test made. Use it as
    a decorator."""

    def __init__(self, respond: Callable[[web.Request, int], Awaitable[web.StreamResponse]]) -> None:
        self.calls = 0

        async def handler(request: web.Request) -> web.StreamResponse:  # aiohttp wants a coroutine function
            self.calls += 1
            return await respond(request, self.calls)

        self.handler = handler


@pytest.fixture
def worker_processes(redis_server, tmp_path) -> Iterator[WorkerProcesses]:
    procs = WorkerProcesses(redis_server.url, tmp_path)
    yield procs
    for proc in procs.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


class Fleet:
    """Worker processes (the demo handler, 20 ms a message) of one partitioned queue, started and killed by
    the test."""

    def __init__(self, url: str, logs: Path, stream: str, partitions: int, **env: str) -> None:
        self.logs = logs
        self.url = url
        self.settings = {
            "stream": stream,
            "partitions": str(partitions),
            "handler": "streamqueue_harness.demo_handler:handle",
            "demo_delay_ms": "20",
            "block_ms": "200",
            "claim_idle_ms": "2000",
            "concurrency": "16",
            **env,
        }
        self.procs: dict[str, Popen[bytes]] = {}

    def start(self, name: str) -> None:
        self.procs[name] = spawn_worker(self.url, name, self.logs / f"{name}.log", **self.settings)

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs.pop(name).wait(timeout=10)

    def stop(self, name: str) -> None:
        """SIGTERM, as the kubelet does on scale-in: the worker drains and exits 0."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, (self.logs / f"{name}.log").read_text()[-2000:]

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def fleets(tmp_path) -> Iterator[Callable[..., Fleet]]:
    """``fleets(url, stream, partitions, "w-1", ..., **settings)``: a Fleet with the named workers started;
    every worker of every fleet killed after the test."""
    made: list[Fleet] = []

    def start(url: str, stream: str, partitions: int, *workers: str, **settings: str) -> Fleet:
        made.append(Fleet(url, tmp_path, stream, partitions, **settings))
        for name in workers:
            made[-1].start(name)
        return made[-1]

    yield start
    for fleet in made:
        fleet.close()
