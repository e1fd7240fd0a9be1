"""Fixtures for the gateway's API tests: the gateway app on a loopback port in front of a real
redis-server and real worker processes (``python -m streamqueue.worker``, as pods run them).

Callers authenticate with API keys from a keys file, as in production: ``alice`` (tier ``pro``) and
``bob`` (tier ``free``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from streamqueue import Client, wire
from streamqueue_gateway.app import make_app, make_runner
from streamqueue_gateway.auth import hash_key
from streamqueue_gateway.config import GatewayConfig
from streamqueue_gateway.core import GATEWAY, Gateway
from streamqueue_harness.ports import free_port
from streamqueue_harness.processes import stop_groups
from streamqueue_harness.redis_server import RedisServer
from streamqueue_harness.workerproc import spawn_worker

KEYS = {"alice": "sk-alice-test", "bob": "sk-bob-test"}
TIERS = {"alice": "pro", "bob": "free"}
TOKENS_HANDLER = "streamqueue_harness.token_handler:handle"
MODEL_HANDLER = "streamqueue.handlers.openai:handle"


@dataclass
class RunningGateway:
    """One gateway replica: its base URL (``http://127.0.0.1:<port>``) and its state."""

    url: str
    app: web.Application

    @property
    def state(self) -> Gateway:
        return self.app[GATEWAY]

    def headers(self, user: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[user]}"}


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    entries = [{"sha256": hash_key(key), "user": user, "tier": TIERS[user]} for user, key in KEYS.items()]
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture
def gateway_config(redis_server: RedisServer, keys_file: Path) -> Callable[..., GatewayConfig]:
    """``gateway_config(**overrides)``: one model ``tokens`` on the default queue; overrides by alias."""

    def make(**overrides: Any) -> GatewayConfig:
        values: dict[str, Any] = {
            "redis": {"url": redis_server.url},
            "models": [{"name": "tokens"}],
            "auth": {"apiKeysFile": str(keys_file)},
            "tiers": {"pro": {}, "free": {}},
            "requestTimeoutSeconds": 30,
            "resumeGraceSeconds": 1,  # short, for tests of the grace; with a browser retry to match:
            "sseRetrySeconds": 0.3,
            **overrides,
        }
        return GatewayConfig.model_validate(values)

    return make


@pytest.fixture
async def gateways(gateway_config: Callable[..., GatewayConfig]) -> AsyncIterator[Callable[..., Any]]:
    """``await gateways(config=None)``: a gateway replica (several share the Redis); stopped after."""
    runners: list[web.AppRunner] = []

    async def start(config: GatewayConfig | None = None) -> RunningGateway:
        app = make_app(config or gateway_config())
        runner = make_runner(app)
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return RunningGateway(f"http://127.0.0.1:{port}", app)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def workers(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., Popen[bytes]]]:
    """``workers(name, **settings)``: a worker process (default handler: numbered tokens); stopped after."""
    procs: list[Popen[bytes]] = []

    def start(name: str = "w1", **settings: str) -> Popen[bytes]:
        settings = {"handler": TOKENS_HANDLER, "block_ms": "200", "tokens_interval_ms": "5", **settings}
        procs.append(spawn_worker(redis_server.url, name, tmp_path / f"{name}.log", **settings))
        return procs[-1]

    yield start
    stop_groups([(proc.pid, proc) for proc in procs], grace=10)


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, str]]:
    """The server-sent events of a response, each as its fields (``id``, ``event``, ``data``), as an
    EventSource dispatches them."""
    event: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if "data" in event:  # a block without data (``retry:``) dispatches no event
                yield event
            event = {}
            continue
        name, _, value = line.partition(": ")
        event[name] = value


def reply_entries(redis_server: RedisServer, user: str, request_id: str) -> list[dict[str, str]]:
    """Every entry of ``user``'s reply stream for ``request_id`` (chunks, then the final one)."""
    r = redis_server.client(decode_responses=True)
    entries = r.xrange(wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, user))
    return [fields for _, fields in entries if fields.get(wire.REQUEST_ID) == request_id]


def final_entry(redis_server: RedisServer, user: str, request_id: str) -> dict[str, str] | None:
    """The request's final reply entry, once written."""
    return next((f for f in reply_entries(redis_server, user, request_id) if wire.RESPONSE in f), None)


async def warmed_up(redis_server: RedisServer) -> None:
    """Return once a worker answers (a one-token request straight on the queue), for tests whose
    timing starts with their request."""
    async with Client(redis_server.url) as client:
        await client.request("warm-up", "tokens=1", timeout=60)
