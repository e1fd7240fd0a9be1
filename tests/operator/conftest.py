"""Fixtures for the operator's integration tests: the CRD installed, the operator as a subprocess.

The operator runs exactly as in production (``python -m streamqueue_operator``), against the local
control plane's kubeconfig, watching only the test's namespace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from streamqueue_harness.operatorproc import OperatorProcess
from streamqueue_harness.redis_server import RedisServer

from tests.operator.queues import Queues


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
        op = OperatorProcess(
            kubeconfig or control_plane.kubeconfig, scope, tmp_path, "--status-min-interval=1", *extra
        )
        started.append(op.start())
        return op

    yield start
    for op in started:
        op.stop()


@pytest.fixture
def sq(control_plane: Any, kube_namespace: str, api: k8s.ApiClient, redis_server: RedisServer) -> Queues:
    return Queues(control_plane, kube_namespace, api, redis_server.url)
