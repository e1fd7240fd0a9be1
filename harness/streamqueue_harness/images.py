"""The container images a real node runs, as archives containerd can import (built by ``hack/images.sh``).

No registry is reachable here, so the node gets its images from archives: the worker and operator, the
sandbox (pause) image, CoreDNS for cluster DNS, Redis for the queue's ``redis`` StatefulSet and the gateway.
``hack/images.sh export`` builds what is out of date (a warm run takes seconds) and names each archive's
image as the kubelet will ask for it (``docker.io/streamqueue/worker:<version>``). A cold build needs
Debian's mirror, which a private network namespace cannot reach: ``make images`` runs before the tests.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "hack" / "images.sh"
# Reused across runs: an export is rewritten only when its image changed.
DEFAULT_DIR = REPO_ROOT / ".cluster" / "images"


class ImagesMissingError(RuntimeError):
    """The images could not be built or exported; the message has the script's explanation."""


# The archive names `hack/images.sh export` writes, in the order `hack/images.sh names` prints them.
ARCHIVES = ("worker", "operator", "pause", "coredns", "redis", "gateway")


@dataclass(frozen=True)
class Images:
    worker: str
    operator: str
    sandbox: str
    coredns: str
    redis: str
    gateway: str
    archives: tuple[Path, ...]


def _script(*args: str, timeout: float) -> str:
    # The names the chart defaults to; BASE=offline: the base image is made from Debian packages and no
    # registry is ever asked for one, not even by a lookup that would fail.
    env = {**os.environ, "IMAGE_REPO": "streamqueue", "BASE": "offline"}
    try:
        result = subprocess.run(
            ["bash", str(SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise ImagesMissingError(f"hack/images.sh {' '.join(args)} took over {timeout:.0f}s") from None
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-10:])
        raise ImagesMissingError(f"hack/images.sh {' '.join(args)} failed; run `make images`:\n{tail}")
    return result.stdout


def image_archives(directory: Path = DEFAULT_DIR, timeout: float = 1800.0) -> Images:
    """Export (building first if needed) the node's images into ``directory``."""
    _script("export", str(directory), timeout=timeout)
    worker, operator, sandbox, coredns, redis, gateway = _script("names", timeout=60).split()
    archives = tuple(directory / f"{name}.tar" for name in ARCHIVES)
    return Images(worker, operator, sandbox, coredns, redis, gateway, archives)
