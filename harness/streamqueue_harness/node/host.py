"""What the node changes on the host outside its namespaces, and how teardown undoes it.

The kubelet has no user-namespace mode here, so its container manager sets a few global kernel
sysctls at start: their values are recorded first and restored on teardown. The pods' cgroups and
containerd's shims (which outlive containerd by design) are host-wide too. Mounts and network
devices need no cleanup: they live in the run's namespaces, which vanish with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..eventually import eventually
from .prerequisites import NodeError

CGROUP_ROOT = Path("/sys/fs/cgroup")
# What the kubelet's container manager writes at start (setupKernelTunables): global, not per namespace.
KUBELET_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)


def read_sysctls() -> dict[str, str]:
    return {key: Path("/proc/sys", key).read_text().strip() for key in KUBELET_SYSCTLS}


def restore_sysctls(values: dict[str, str]) -> None:
    for key, value in values.items():
        path = Path("/proc/sys", key)
        if path.read_text().strip() != value:
            path.write_text(value)


def cgroup_dirs(cgroup_root: str) -> list[Path]:
    """``cgroup_root`` in every mounted cgroup v1 hierarchy (where the kubelet puts the pods)."""
    hierarchies = [p for p in CGROUP_ROOT.iterdir() if (p / "cgroup.procs").exists() and p.name != "unified"]
    return [h / cgroup_root.lstrip("/") for h in hierarchies]


def _kill_cgroup_processes(trees: Sequence[Path], timeout: float = 10.0) -> None:
    """SIGKILL every process in the trees (containers whose shim and kubelet are gone), until none is left."""

    def none_left_after_kill() -> bool:
        pids = {int(pid) for tree in trees if tree.exists() for pid in _tree_pids(tree)}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not pids

    what = f"no process left in the pods' cgroups {trees[0]}"
    eventually(none_left_after_kill, what, timeout, error=NodeError)


def container_pids(cgroup_root: str, container_id: str) -> set[int]:
    """The processes of one container: its cgroup is named after its id under the node's ``cgroup_root``."""
    return {
        int(pid)
        for tree in cgroup_dirs(cgroup_root)
        if tree.exists()
        for directory in tree.rglob(container_id)
        for pid in _tree_pids(directory)
    }


def kill_container(cgroup_root: str, container_id: str) -> int:
    """SIGKILL every process of one container, as the OOM killer or a crash would end it; returns how
    many were killed.

    Not ``kubectl delete --grace-period=0``: the kubelet still sends SIGTERM first there."""
    pids = container_pids(cgroup_root, container_id)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def _tree_pids(tree: Path) -> list[str]:
    return [pid for procs in tree.rglob("cgroup.procs") for pid in procs.read_text().split()]


def _remove_cgroups(trees: Sequence[Path]) -> None:
    for tree in trees:
        if tree.exists():
            for directory in sorted((d for d in tree.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
                directory.rmdir()
            tree.rmdir()


def _kill_shims(socket: str) -> None:
    """containerd's shims outlive it by design; those serving this node's containerd are killed."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and socket.encode() in argv:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def clean_host(facts: dict[str, Any]) -> None:
    """After the components stopped: no pod process, shim, cgroup or changed sysctl is left."""
    trees = cgroup_dirs(facts["cgroup_root"])
    _kill_cgroup_processes(trees)
    _kill_shims(facts["containerd"])
    _remove_cgroups(trees)
    restore_sysctls(facts["sysctls"])
