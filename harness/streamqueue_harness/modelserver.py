"""A real OpenAI-compatible model server for tests and benchmarks: llama-cpp-python's, on a tiny model.

``hack/llama.sh`` builds llama-cpp-python[server] and gguf into a venv cached outside the repository;
``tinymodel.py`` (run by that venv's Python) writes a tiny llama GGUF; ``ModelServer`` starts
``python -m llama_cpp.server`` on a free loopback port and waits until ``/v1/models`` answers. The
process is spawned in its own group and dies with the thread that started it, so nothing outlives
the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from .eventually import eventually
from .ports import free_port
from .processes import LocalServer, spawn

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # keep in step with hack/llama.sh
TINYMODEL = Path(__file__).with_name("tinymodel.py")


def llama_venv() -> Path:
    """Where hack/llama.sh puts the venv (``STREAMQUEUE_LLAMA_VENV`` overrides)."""
    explicit = os.environ.get("STREAMQUEUE_LLAMA_VENV")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("STREAMQUEUE_LLAMA_CACHE") or str(Path.home() / ".cache" / "streamqueue-llama")
    return Path(cache) / LLAMA_CPP_PYTHON_VERSION / "venv"


def llama_python() -> Path | None:
    """The venv's Python when llama_cpp.server and gguf are installed there, else None."""
    python = llama_venv() / "bin" / "python"
    if not python.exists():
        return None
    probe = subprocess.run(
        [str(python), "-c", "import llama_cpp.server, gguf"], capture_output=True, timeout=60, check=False
    )
    return python if probe.returncode == 0 else None


def write_tiny_model(python: Path, path: Path) -> Path:
    """Generate the tiny GGUF with the venv's ``gguf`` package."""
    subprocess.run([str(python), str(TINYMODEL), str(path)], check=True, capture_output=True, timeout=120)
    return path


class _Exited(Exception):
    """The server process ended before it answered."""


class ModelServer(LocalServer):
    """``python -m llama_cpp.server`` serving the tiny model on ``host`` (loopback, or the node's IP for
    pods to reach); ``base_url`` ends in /v1."""

    log_name = "llama-server.log"

    def __init__(
        self, python: Path, *, n_ctx: int = 512, workdir: Path | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.python = python
        self.host = host
        self.n_ctx = n_ctx
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="sq-llama-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.model = self.workdir / "tiny.gguf"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self, timeout: float = 120.0, attempts: int = 3) -> ModelServer:
        if not self.model.exists():
            write_tiny_model(self.python, self.model)
        for _ in range(attempts):  # a free port can be taken before the server binds it
            self.port = free_port(self.host)
            args = [str(self.python), "-m", "llama_cpp.server", "--model", str(self.model)]
            args += ["--host", self.host, "--port", str(self.port), "--n_ctx", str(self.n_ctx)]
            args += ["--model_alias", "tiny"]
            self.proc = spawn(args, log=self.log_path)
            if self._wait_ready(timeout):
                return self
            self.stop()
        log = self.log_path
        raise RuntimeError(f"llama_cpp.server did not start; see {log}:\n{log.read_text()[-2000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        """True once ``/v1/models`` answers; False when the server exits first (its port was taken) or
        does not answer within ``timeout``."""
        try:
            return eventually(self._answers, "llama_cpp.server /v1/models", timeout, error=TimeoutError)
        except (TimeoutError, _Exited):
            return False

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise _Exited
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                json.load(response)
                return True
        except (urllib.error.URLError, OSError, ValueError):
            return False


# A stub that follows the OpenAI streaming format exactly, for what the tiny real server cannot do:
# return chosen error statuses, and serve 1,000 concurrent streams (bench/model_stream.py).


def completion_chunk(content: str | None, *, finish_reason: str | None = None, role: bool = False) -> bytes:
    """One ``data: {...}`` event of a streamed chat completion, as OpenAI's API writes it."""
    delta: dict[str, str] = {"role": "assistant"} if role else {}
    if content is not None:
        delta["content"] = content
    event = {
        "id": "chatcmpl-stub",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "stub",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def stream_completion(
    request: web.Request, words: list[str], interval_s: float = 0.0
) -> web.StreamResponse:
    """Answer ``request`` with ``words`` as content deltas, ``interval_s`` apart, then ``data: [DONE]``."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    await response.write(completion_chunk(None, role=True))
    for i, word in enumerate(words):
        if i and interval_s:
            await asyncio.sleep(interval_s)
        await response.write(completion_chunk(word))
    await response.write(completion_chunk(None, finish_reason="stop"))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


class StubChatServer:
    """An aiohttp server on 127.0.0.1 whose ``POST /v1/chat/completions`` is ``respond``."""

    def __init__(self, respond: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
        self.respond = respond
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> StubChatServer:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.respond)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        for _ in range(3):
            self.port = free_port()
            try:
                await web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=4096).start()
                return self
            except OSError:
                continue
        raise RuntimeError("no free port for the stub chat server")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> StubChatServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
