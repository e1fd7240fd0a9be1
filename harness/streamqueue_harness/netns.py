"""Private network and mount namespaces for a test run, so a real node's traffic and mounts stay in it.

A real node needs addresses that are not loopback (the kubelet refuses a loopback node IP, and pods
live in network namespaces of their own), and it mounts things (container root filesystems, volume
tmpfs, pod network namespaces). ``enter_private_namespaces`` moves the calling process, and so every
child it starts from then on, into a new network namespace (only its own loopback, plus the bridge the
node adds) and a new mount namespace whose mounts never propagate to the host. When the last process
in them exits, the kernel removes both: nothing can be left behind on the host's network or mounts.

Only ``unshare(2)`` is needed, which root has; it must run while the process is single-threaded
(the kernel refuses a new mount namespace to a multi-threaded process), so callers do it first.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
# Host directories the node writes to whatever it is configured with: containerd 1.6's shim sockets
# (/run/containerd/s), the CNI result cache, the kubelet's /var/log/containers links. A tmpfs over
# each, in the private mount namespace, keeps that state in the run and off the host.
PRIVATE_TMPFS = ("/run/containerd", "/var/lib/cni", "/var/log/containers")
MARK = "STREAMQUEUE_PRIVATE_NETNS"

_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceError(RuntimeError):
    """The process could not get its own namespaces (not root, or already multi-threaded)."""


def _run(*args: str) -> None:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NamespaceError(f"{' '.join(args)} failed: {result.stderr.strip()}")


def _network_namespace() -> str:
    return os.readlink("/proc/self/ns/net")


def in_private_namespaces() -> bool:
    """True in namespaces that ``enter_private_namespaces`` made (this process's or a parent's).

    The mark is the namespace's id in the environment, which children inherit: pid 1's namespaces
    cannot be read on every machine (here not even by root), so "not init's" is no usable test.
    """
    return os.environ.get(MARK) == _network_namespace()


def enter_private_namespaces(tmpfs: Sequence[str] = PRIVATE_TMPFS) -> None:
    """Move this process into a new network and mount namespace, with loopback up.

    Mounts are made private recursively first, so nothing mounted here (by containerd, the kubelet or
    ``tmpfs``) reaches the host, and nothing the host mounts later reaches the node.
    """
    if os.geteuid() != 0:
        raise NamespaceError("a private network namespace needs root (unshare(2) with CAP_SYS_ADMIN)")
    if _libc.unshare(CLONE_NEWNET | CLONE_NEWNS) != 0:
        errno = ctypes.get_errno()
        raise NamespaceError(
            f"unshare(CLONE_NEWNET|CLONE_NEWNS) failed: {os.strerror(errno)}"
            " (it must run before the process starts any thread)"
        )
    os.environ[MARK] = _network_namespace()
    _run("mount", "--make-rprivate", "/")
    _run("ip", "link", "set", "lo", "up")
    for path in tmpfs:
        os.makedirs(path, exist_ok=True)
        _run("mount", "-t", "tmpfs", "-o", "mode=0711", "tmpfs", path)


def add_bridge(name: str, address: str) -> None:
    """A Linux bridge with ``address`` (CIDR), up: the node's IP and the pods' gateway in one place."""
    _run("ip", "link", "add", name, "type", "bridge")
    _run("ip", "addr", "add", address, "dev", name)
    _run("ip", "link", "set", name, "up")


def add_route(destination: str, device: str) -> None:
    """Route ``destination`` (CIDR) out of ``device``: how the namespace reaches addresses no link has."""
    _run("ip", "route", "add", destination, "dev", device)


def delete_link(name: str) -> None:
    _run("ip", "link", "del", name)


def new_network_namespace(path: Path) -> None:
    """A new network namespace kept alive by a bind mount on ``path`` (no process needs to stay in it).

    The mount is in the run's private mount namespace, so the namespace vanishes with the run, like
    the run's own; no name is registered under the host's /run/netns.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    _run("unshare", f"--net={path}", "true")


def add_veth_pair(here: str, there: str, namespace: Path) -> None:
    """A veth pair: ``here`` in this namespace, ``there`` in the one bound on ``namespace``."""
    _run("ip", "link", "add", here, "type", "veth", "peer", "name", there, "netns", str(namespace))


def in_namespace(namespace: Path | None) -> list[str]:
    """The command prefix that runs a program in the network namespace bound on ``namespace`` (None:
    this one), keeping the mount namespace: containerd and the kubelet must see each other's mounts."""
    return [] if namespace is None else ["nsenter", f"--net={namespace}", "--"]


def run_in_namespace(namespace: Path | None, *args: str) -> None:
    _run(*in_namespace(namespace), *args)


def delete_network_namespace(path: Path) -> None:
    """Release a namespace made by ``new_network_namespace``: it ends once no process is left in it."""
    _run("umount", str(path))
    path.unlink()
