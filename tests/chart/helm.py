"""Helpers for the chart tests: the pinned helm binary and rendered manifests."""

from __future__ import annotations

from typing import Any

import yaml
from streamqueue_harness.controlplane import REPO_ROOT as ROOT
from streamqueue_harness.helm import CHART, helm

__all__ = ["CHART", "KUBE_VERSION", "ROOT", "by_kind", "helm", "render"]

KUBE_VERSION = "1.35.4"


def render(*set_args: str, namespace: str = "streamqueue-system") -> list[dict[str, Any]]:
    """Render the chart with ``--set`` arguments and return the manifests (CRDs excluded)."""
    args = ["template", "sq", str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    for s in set_args:
        args += ["--set", s]
    out = helm(*args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]
