"""pytest fixtures for the local control plane and the real node (registered from tests/conftest.py).

``control_plane`` starts one real control plane per test session; ``kube_namespace`` gives each test
a fresh namespace so tests never see each other's objects. ``node_cluster`` starts a second control
plane with a real node joined to it (containerd, kubelet, kube-scheduler, kube-proxy) that runs pods
from the images built here. Tests that use them need the pinned binaries and the images: when they
are missing the fixture fails with the command to build them, it never skips, so CI cannot pass
without having run these tests. Tests that use ``control_plane`` (directly or through
``kube_namespace``) are marked ``kube`` automatically, those that use ``node_cluster`` ``node``.

Run as root, the whole session lives in network and mount namespaces of its own (``netns``): every
server a test starts, and the node's bridge, pods and mounts, exist only there and vanish with the
run. Without root the session stays where it is and only the node's tests fail (they need root).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator

import pytest

from .controlplane import ControlPlane, ToolsMissingError
from .images import ImagesMissingError
from .netns import enter_private_namespaces, in_private_namespaces
from .node import Node, NodeError, running_node

_NAMESPACE_MAX = 63


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "node: needs the real node (root, `make tools`, `make images`)")
    if os.geteuid() == 0 and not in_private_namespaces():
        enter_private_namespaces()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "control_plane" in fixtures:
            item.add_marker(pytest.mark.kube)
        if "node_cluster" in fixtures:
            item.add_marker(pytest.mark.kube)
            item.add_marker(pytest.mark.node)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver and kube-controller-manager on loopback, for the whole session."""
    plane = ControlPlane(tmp_path_factory.mktemp("controlplane"))
    try:
        plane.start()
    except ToolsMissingError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield plane
    finally:
        plane.stop()


def namespace_for(test_name: str) -> str:
    """A DNS-1123 label unique per call, readable in `kubectl get ns`: t-<test name>-<random>."""
    suffix = secrets.token_hex(3)
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")
    slug = slug[: _NAMESPACE_MAX - len(suffix) - 3].strip("-")
    return f"t-{slug}-{suffix}" if slug else f"t-{suffix}"


@pytest.fixture
def kube_namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace whose default ServiceAccount exists (so Pods are admitted), deleted afterwards."""
    name = namespace_for(request.node.name)
    control_plane.kubectl("create", "namespace", name)
    control_plane.wait_for_default_serviceaccount(name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A control plane with a real node joined to it, for the whole session; ``.plane`` is its control plane.

    Separate from ``control_plane``: there a kube-scheduler would race the pod runner for its pods.
    """
    if not in_private_namespaces():
        pytest.fail("the real node needs root: the session runs it in namespaces of its own", pytrace=False)
    try:
        with running_node(tmp_path_factory.mktemp("node")) as node:
            yield node
    except (ToolsMissingError, ImagesMissingError, NodeError) as exc:
        pytest.fail(str(exc), pytrace=False)
