"""Stopping a gateway process (SIGTERM, as Kubernetes stops a pod): readiness fails at once, a stream in
flight runs to its end, and the process exits within its configured bound (below the pod's grace)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import yaml
from streamqueue_gateway.config import GatewayConfig
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.ports import free_port
from streamqueue_harness.processes import spawn, stop_groups
from streamqueue_harness.token_handler import tokens

from tests.gateway.conftest import KEYS

CLI = [sys.executable, "-m", "streamqueue_gateway"]
# How long the interpreter may take to tear down after the gateway's own bound.
EXIT_SLACK_S = 2.0


async def readiness(http: aiohttp.ClientSession, base: str) -> int | None:
    """/readyz's status, None once the port is closed."""
    try:
        async with http.get(f"{base}/readyz") as response:
            return response.status
    except aiohttp.ClientConnectionError:
        return None


def deltas(lines: list[bytes]) -> str:
    """The text of a chat.completion.chunk event stream."""
    text = ""
    for line in lines:
        data = line.decode().removeprefix("data: ").strip()
        if data and data != "[DONE]":
            text += "".join(c["delta"].get("content") or "" for c in json.loads(data)["choices"])
    return text


async def test_sigterm_fails_readiness_lets_a_stream_finish_and_exits_in_time(
    gateway_config: Callable[..., GatewayConfig], workers: Callable[..., object], tmp_path: Path
) -> None:
    workers(tokens_interval_ms="100")
    config = gateway_config(shutdownDelaySeconds=2, shutdownTimeoutSeconds=15)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True, exclude_none=True)))
    port, log = free_port(), tmp_path / "gateway.log"
    proc = spawn([*CLI, "--config", str(path), "--host", "127.0.0.1", "--port", str(port)], log=log)
    base = f"http://127.0.0.1:{port}"
    body = {"model": "tokens", "messages": [{"role": "user", "content": "tokens=40"}], "stream": True}
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                assert proc.poll() is None, log.read_text()
                return await readiness(http, base) == 200

            await eventually_async(ready, "the gateway to be ready", timeout=60)
            headers = {"Authorization": f"Bearer {KEYS['alice']}"}
            async with http.post(f"{base}/v1/chat/completions", json=body, headers=headers) as response:
                lines = [await response.content.readline()]  # the first chunk: the stream is in flight
                proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()

                async def unready() -> bool:
                    return await readiness(http, base) == 503

                await eventually_async(
                    unready, "/readyz to fail after SIGTERM", timeout=config.shutdown_delay_seconds
                )
                lines += [line async for line in response.content]
            exit_code = await asyncio.to_thread(proc.wait, config.shutdown_bound_seconds + EXIT_SLACK_S)
            stopped_in = time.monotonic() - signalled
    finally:
        stop_groups([(proc.pid, proc)], grace=5)
    assert deltas(lines) == "".join(tokens(40)) and lines[-2] == b"data: [DONE]\n"
    assert exit_code == 0, log.read_text()
    assert stopped_in < config.shutdown_bound_seconds + EXIT_SLACK_S
