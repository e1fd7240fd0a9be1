"""What a node needs on this machine before it starts, and the error that says what is missing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..controlplane import ToolsMissingError
from ..netns import in_private_namespaces
from .network import CNI_BIN_DIR

BINARIES = ("kubelet", "kube-scheduler", "kube-proxy")
HOST_PROGRAMS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip", "iptables")


class NodeError(RuntimeError):
    """The node cannot start here; the message says what is missing."""


def check_node_prerequisites(bin_dir: Path) -> None:
    """Fail with what to install: the built node binaries, Debian's containerd/runc/CNI plugins, root."""
    missing = [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if missing:
        raise ToolsMissingError(f"{', '.join(missing)} missing from {bin_dir}: run `make tools`")
    programs = [p for p in HOST_PROGRAMS if shutil.which(p) is None]
    if programs or not (CNI_BIN_DIR / "bridge").exists():
        raise NodeError(
            f"missing {', '.join(programs) or 'CNI plugins'}: run `make setup` (Debian packages containerd, "
            "runc, containernetworking-plugins, iproute2, iptables)"
        )
    if not in_private_namespaces():
        raise NodeError(
            "the node must run in the run's own network namespace (netns.enter_private_namespaces)"
        )
