"""What the control-plane fixtures promise without starting one: names and the missing-tools failure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from streamqueue_harness.controlplane import ControlPlane, ToolsMissingError
from streamqueue_harness.pytest_plugin import namespace_for

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@given(st.text(max_size=300))
def test_namespace_names_are_dns_labels_whatever_the_test_is_called(test_name: str) -> None:
    name = namespace_for(test_name)
    assert len(name) <= 63 and DNS_LABEL.match(name), name


def test_namespace_names_are_unique_and_readable() -> None:
    names = {namespace_for("test_scale[out-3]") for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith("t-test-scale-out-3-") for n in names)


def test_missing_tools_fail_with_the_command_that_builds_them(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "etcd").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "etcd").chmod(0o755)
    with pytest.raises(
        ToolsMissingError, match=r"kube-apiserver, kube-controller-manager, kubectl; run `make tools`"
    ):
        ControlPlane(tmp_path / "cluster", bin_dir=tmp_path / "bin").start()
    assert not (tmp_path / "cluster").exists()
