"""A real ``redis-server`` on a free loopback port, for tests, benchmarks and the demo.

Tests must exercise the real server (XAUTOCLAIM, XINFO lag semantics, reconnects), so this starts
the Debian ``redis-server`` binary without persistence and can stop and restart it on the same port
to simulate an outage.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import redis

from .eventually import eventually
from .ports import free_port
from .processes import Supervised, spawn


class RedisServer(Supervised):
    """One ``redis-server`` process; ``stop()``/``start()`` keep the port so clients can reconnect."""

    def __init__(
        self, port: int | None = None, password: str | None = None, also_bind: Sequence[str] = ()
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self.host = "127.0.0.1"
        # Further addresses to listen on: a real node's pods reach Redis at the node IP.
        self.also_bind = tuple(also_bind)
        self._dir = Path(tempfile.mkdtemp(prefix="sq-redis-"))

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, password=self.password, **kwargs)  # type: ignore[arg-type]

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: run `make setup` (Debian package redis-server)")
        options = {
            "port": str(self.port),
            "bind": " ".join((self.host, *self.also_bind)),
            "save": "",  # no persistence: a stop is a real outage that loses data
            "appendonly": "no",
            "dir": str(self._dir),
            "daemonize": "no",
            "loglevel": "warning",
        }
        args = [binary, *(arg for name, value in options.items() for arg in (f"--{name}", value))]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = spawn(args, log=self._dir / "redis-server.log")
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        eventually(self._answers, f"redis-server on port {self.port}", timeout, 0.05, error=TimeoutError)

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode} on port {self.port}")
        try:
            return bool(self.client(socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        """``stop`` (data is lost, as in a real outage without persistence), then remove its files."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
