"""Fixtures of the real-node tests that need more than ``node_cluster``: the gateway in front of a queue
whose worker calls a real model server (llama-cpp-python's, on a tiny model).

Session-scoped, like the node: the gateway tests (the openai SDK's, the browser's) share one install.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from streamqueue_harness.modelserver import ModelServer, llama_python, llama_venv
from streamqueue_harness.node import NODE_IP, Node
from streamqueue_harness.nodegateway import NodeGateway, deploy


@pytest.fixture(scope="session")
def node_llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """llama_cpp.server on the node's IP, where the pods reach it (as they reach the model stand-in)."""
    python = llama_python()
    if python is None:  # fail, not skip: CI must not pass without the real server
        pytest.fail(f"no llama-cpp-python server in {llama_venv()}: run `bash hack/llama.sh`", pytrace=False)
    with ModelServer(python, workdir=tmp_path_factory.mktemp("node-llama"), host=NODE_IP) as server:
        yield server


@pytest.fixture(scope="session")
def node_gateway(node_cluster: Node, node_llama: ModelServer) -> NodeGateway:
    """The chart's gateway (``helm upgrade --install`` with ``gateway.enabled``) in front of the queue
    ``nodegateway.QUEUE``, whose worker runs the model handler against ``node_llama``; each user of
    ``nodegateway.USERS`` has an API key (``.keys``), their hashes in a Secret."""
    return deploy(node_cluster.plane, node_cluster.images.redis, node_llama.base_url)
