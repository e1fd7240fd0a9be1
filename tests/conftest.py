"""Shared fixtures: a real redis-server per test (free loopback port), a real Redis Cluster per module.

The control-plane fixtures (``control_plane``, session scope, and ``kube_namespace``) come from
``streamqueue_harness.pytest_plugin``, registered here so every test directory can use them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from streamqueue_harness.node import NODE_IP
from streamqueue_harness.nodequeue import ModelStandIn
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


@pytest.fixture
def node_model() -> Iterator[ModelStandIn]:
    """The model stand-in of the real-node tests, on the first node's IP (pods on a second node reach it
    through the veth pair's routes): half a second per message, so a burst builds a backlog."""
    stand_in = ModelStandIn(NODE_IP, 0.5)
    yield stand_in
    stand_in.close()
