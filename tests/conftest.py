"""Shared fixtures: a real redis-server per test (free loopback port), a real Redis Cluster per module.

The control-plane fixtures (``control_plane``, session scope, and ``kube_namespace``) come from
``streamqueue_harness.pytest_plugin``, registered here so every test directory can use them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from streamqueue_harness.operatorproc import install_crd
from streamqueue_harness.redis_cluster import RedisClusterServer
from streamqueue_harness.redis_server import RedisServer

pytest_plugins = ["streamqueue_harness.pytest_plugin"]


@pytest.fixture(scope="session")
def streamqueue_crd(control_plane: Any) -> dict[str, Any]:
    """The generated CRD applied to the control plane (server-side) and established."""
    return install_crd(control_plane)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty redis-server for one test; stopped (and its files removed) afterwards."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterServer]:
    """Three primaries with a replica each on loopback, shared by a module's tests (forming takes seconds)."""
    with RedisClusterServer() as cluster:
        yield cluster
