"""Fixtures for the operator's integration tests: the CRD installed, the operator as a subprocess.

The operator runs exactly as in production (``python -m streamqueue_operator``), against the local
control plane's kubeconfig, watching only the test's namespace.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kubernetes import client as k8s
from streamqueue_operator import crdgen, models

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``check`` until it returns a truthy value; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T = check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(interval)
        last = check()
    return last


class OperatorProcess:
    """``streamqueue-operator <scope>`` in a subprocess; restartable, log kept for failures."""

    def __init__(self, kubeconfig: Path, scope: str, log_dir: Path, *extra: str) -> None:
        self.kubeconfig, self.scope, self.extra = kubeconfig, scope, extra
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"operator-{self.starts}.log"

    def start(self) -> OperatorProcess:
        self.starts += 1
        cmd = [
            sys.executable, "-m", "streamqueue_operator", self.scope,
            "--metrics-port=0", "--liveness-port=0", "--status-min-interval=1", *self.extra,
        ]  # fmt: skip
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONWARNINGS": "ignore"}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.log_dir.glob("operator-*.log")))


@pytest.fixture(scope="session")
def streamqueue_crd(control_plane: Any) -> dict[str, Any]:
    """The generated CRD applied to the control plane (server-side) and established."""
    crd = crdgen.build_crd()
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump(crd))
    control_plane.kubectl(
        "wait", "--for=condition=Established", f"crd/{models.PLURAL}.{models.GROUP}", "--timeout=60s"
    )
    return crd


@pytest.fixture
def api(control_plane: Any) -> Iterator[k8s.ApiClient]:
    with control_plane.api_client() as client:
        yield client


@pytest.fixture
def start_operator(
    control_plane: Any, kube_namespace: str, streamqueue_crd: dict[str, Any], tmp_path: Path
) -> Iterator[Callable[..., OperatorProcess]]:
    """Start the operator for the test namespace (or another scope, or kubeconfig); stopped after."""
    started: list[OperatorProcess] = []

    def start(*extra: str, kubeconfig: Path | None = None, scope: str | None = None) -> OperatorProcess:
        scope = scope or f"--namespace={kube_namespace}"
        op = OperatorProcess(kubeconfig or control_plane.kubeconfig, scope, tmp_path, *extra)
        started.append(op.start())
        return op

    yield start
    for op in started:
        op.stop()
