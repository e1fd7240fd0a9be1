"""pytest fixtures for the local Kubernetes control plane (registered from tests/conftest.py).

``control_plane`` starts one real control plane per test session; ``kube_namespace`` gives each test
a fresh namespace so tests never see each other's objects. Tests that use them need the pinned
binaries: when they are missing the fixture fails with the command to build them, it never skips,
so CI cannot pass without having run these tests. Tests that use ``control_plane`` (directly or
through ``kube_namespace``) are marked ``kube`` automatically, so ``-m "not kube"`` deselects them.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import pytest

from .controlplane import ControlPlane, ToolsMissingError

_NAMESPACE_MAX = 63


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "control_plane" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kube)


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
