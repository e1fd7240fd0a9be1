"""Shared fixtures: a real redis-server per test (free loopback port).

Control-plane fixtures (``kubeconfig``, ``kube_namespace``) live in tests/kube_fixtures.py and are
registered here so every test directory can use them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from streamqueue_harness.redis_server import RedisServer

pytest_plugins = ["streamqueue_harness.pytest_plugin"]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty redis-server for one test; stopped (and its files removed) afterwards."""
    with RedisServer() as server:
        yield server
