"""The worker as a pod runs it, for tests and benchmarks: ``python -m streamqueue.worker``, env only.

One way to start a worker process, beside ``operatorproc``'s one way to start the operator, so the
tests, the benchmarks and the pod runner cannot drift in command, environment or process handling.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from .processes import spawn

WORKER_COMMAND = (sys.executable, "-m", "streamqueue.worker")


def worker_env(
    redis_url: str, consumer: str, base: Mapping[str, str] | None = None, /, **settings: str
) -> dict[str, str]:
    """``base`` (default: this process's environment) with the worker's settings as its env variables.

    ``settings`` are named as in ``WorkerSettings`` (``block_ms="200"`` → ``STREAMQUEUE_BLOCK_MS``);
    the health port is 0 (any free one) unless given, so parallel workers never collide. A setting
    given by name wins (a test may pass ``redis_url`` with credentials of its own).
    """
    named = {"health_port": "0", "redis_url": redis_url, "consumer": consumer, **settings}
    return {
        **(os.environ if base is None else base),
        **{f"STREAMQUEUE_{k.upper()}": v for k, v in named.items()},
    }


def spawn_worker(
    redis_url: str, consumer: str, log: Path, base: Mapping[str, str] | None = None, /, **settings: str
) -> subprocess.Popen[bytes]:
    """Start one worker (its own process group, dies with the starting thread), output to ``log``."""
    return spawn(WORKER_COMMAND, log=log, env=worker_env(redis_url, consumer, base, **settings))
