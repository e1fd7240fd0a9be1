"""Helpers for the chart tests: the pinned helm binary and rendered manifests."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "streamqueue-operator"
HELM = ROOT / ".tools" / "bin" / "helm"
KUBE_VERSION = "1.35.4"


def helm(*args: str, kubeconfig: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        raise RuntimeError("helm not found in .tools/bin: run `make tools`")
    cmd = [str(HELM), *args]
    if kubeconfig is not None:
        cmd += ["--kubeconfig", str(kubeconfig)]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)


def render(*set_args: str, namespace: str = "streamqueue-system") -> list[dict[str, Any]]:
    """Render the chart with ``--set`` arguments and return the manifests (CRDs excluded)."""
    args = ["template", "sq", str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    for s in set_args:
        args += ["--set", s]
    out = helm(*args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]
