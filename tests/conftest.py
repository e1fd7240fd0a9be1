"""Shared fixtures: a real redis-server per test (free loopback port), a real Redis Cluster per module,
the model servers (llama-cpp-python's on a tiny model, one per session; chat-completion stubs).

The control-plane fixtures (``control_plane``, session scope, and ``kube_namespace``) come from
``streamqueue_harness.pytest_plugin``, registered here so every test directory can use them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from streamqueue_harness.modelserver import ModelServer, StubChatServer, llama_python, llama_venv
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


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """llama-cpp-python's server on a tiny generated model, one for the whole session (it takes seconds
    to load, and no test changes its state)."""
    python = llama_python()
    if python is None:  # fail, not skip: CI must not pass without the real server
        pytest.fail(f"no llama-cpp-python server in {llama_venv()}: run `bash hack/llama.sh`", pytrace=False)
    with ModelServer(python, n_ctx=512, workdir=tmp_path_factory.mktemp("llama")) as server:
        yield server


@pytest.fixture
async def stub() -> AsyncIterator[Callable[..., Awaitable[StubChatServer]]]:
    """``await stub(respond)`` starts a chat-completions stub answering with ``respond``; stopped after."""
    servers: list[StubChatServer] = []

    async def start(respond: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> StubChatServer:
        servers.append(await StubChatServer(respond).start())
        return servers[-1]

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
def node_model() -> Iterator[ModelStandIn]:
    """The model stand-in of the real-node tests, on the first node's IP (pods on a second node reach it
    through the veth pair's routes): half a second per message, so a burst builds a backlog."""
    stand_in = ModelStandIn(NODE_IP, 0.5)
    yield stand_in
    stand_in.close()
