"""containerd 1.6 (Debian's) as the node's container runtime: its CRI configuration, ``ctr``, image import.

No registry is reachable, so every image a pod names, the sandbox image included, is imported from
an archive before the kubelet starts. This VM lacks CAP_SYS_RESOURCE and runs cgroup v1: containerd
restricts ``oom_score_adj`` and skips the hugetlb controller.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ..components import StartupError
from .network import CNI_BIN_DIR

log = logging.getLogger(__name__)


def containerd_config(workdir: Path, socket: Path, sandbox_image: str) -> str:
    """containerd 1.6's CRI configuration with every path under ``workdir``."""
    base = workdir / "containerd"
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{base / "root"}"
state = "{base / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{socket}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{base / "opt"}"

[{cri}]
  sandbox_image = "{sandbox_image}"
  # The VM lacks CAP_SYS_RESOURCE: containers may only raise their OOM score, never lower it.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_hugetlb_controller = true
  tolerate_missing_hugetlb_controller = true
  netns_mounts_under_state_dir = true

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{workdir / "cni" / "net.d"}"

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
"""


def ctr(
    socket: Path, *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``ctr`` against this node's containerd, in the namespace the kubelet's CRI uses (``k8s.io``)."""
    cmd = ["ctr", "--address", str(socket), "--namespace", "k8s.io", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise StartupError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
    return result


def import_images(socket: Path, archives: Sequence[Path], sandbox_image: str) -> None:
    """Import every archive; the sandbox image must be among them (containerd cannot pull it)."""
    for archive in archives:
        log.info("importing %s into containerd", archive.name)
        ctr(socket, "images", "import", str(archive))
    names = set(ctr(socket, "images", "list", "--quiet").stdout.split())
    if sandbox_image not in names:
        raise StartupError(f"the sandbox image {sandbox_image} is not among the imported images {names}")
