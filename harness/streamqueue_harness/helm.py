"""The pinned helm binary (``make tools``), as tests, the node end-to-end run and benchmarks call it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .controlplane import REPO_ROOT, default_bin_dir

CHART = REPO_ROOT / "charts" / "streamqueue-operator"


def helm(
    *args: str, kubeconfig: Path | None = None, check: bool = True, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    binary = default_bin_dir() / "helm"
    if not binary.exists():
        raise RuntimeError(f"helm not found in {binary.parent}: run `make tools`")
    cmd = [str(binary), *args]
    if kubeconfig is not None:
        cmd += ["--kubeconfig", str(kubeconfig)]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)
