"""The node's command line: ``make node`` (up), ``make cluster-down`` (down), exec inside its namespaces."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ..components import StartupError, running_components, stop_recorded
from ..controlplane import STATE_FILE as CONTROL_PLANE_STATE
from ..controlplane import ControlPlane, ToolsMissingError, check_tools, default_bin_dir
from ..controlplane import shutdown_phases as control_plane_phases
from ..images import ImagesMissingError, image_archives
from ..netns import NamespaceError, enter_private_namespaces
from .lifecycle import STATE_FILE, node_dir, start_node, stop_node
from .network import NODE_IP, add_node_network
from .prerequisites import NodeError


def _node_pid(workdir: Path) -> int:
    processes = running_components(workdir, CONTROL_PLANE_STATE)
    if not processes:
        raise NodeError(f"no node running from {workdir}: run `make node`")
    return int(processes[0]["pid"])


def _up(workdir: Path, nodes: int, timeout: float) -> int:
    if running_components(workdir / "node", STATE_FILE):
        print(f"node already running: python -m streamqueue_harness.node exec --dir {workdir} -- bash")
        return 0
    try:
        check_tools(default_bin_dir())
        images = image_archives(workdir / "images")
        enter_private_namespaces()
        add_node_network()
        plane = ControlPlane(workdir, detach=True, node_ip=NODE_IP).start(timeout=timeout)
        started = [
            start_node(plane, workdir, images, index, detach=True, timeout=timeout) for index in range(nodes)
        ]
    except (
        ToolsMissingError,
        ImagesMissingError,
        NodeError,
        NamespaceError,
        StartupError,
        TimeoutError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:  # on any failure, nothing half-started stays behind
        if len(_running_nodes(workdir)) < nodes:
            _down(workdir)
    for node in started:
        print(
            f"node {node.name} Ready in {node.start_seconds:.1f}s beside the control plane at {plane.server}"
        )
    print("  it lives in a network namespace of its own; run commands there with:")
    print(f"  python -m streamqueue_harness.node exec --dir {workdir} -- kubectl get nodes -o wide")
    print("  stop it with: make cluster-down")
    return 0


def _running_nodes(workdir: Path) -> list[Path]:
    return [d for d in _node_dirs(workdir) if running_components(d, STATE_FILE)]


def _node_dirs(workdir: Path) -> list[Path]:
    """Every node directory ``up`` may have made, the first node's first."""
    return [node_dir(workdir, 0), *sorted(workdir.glob("node-*"))]


def _down(workdir: Path) -> int:
    """Stop the nodes, the last first (each restores the host sysctls it found), then the control plane.

    A joined node's network namespace and veth need no step here: they live in the namespaces of the
    run that made them, which end with its last process.
    """
    node = sum(stop_node(directory) for directory in reversed(_node_dirs(workdir)))
    plane = stop_recorded(workdir, CONTROL_PLANE_STATE, control_plane_phases)
    print(f"stopped {node} node and {plane} control-plane process(es) from {workdir}")
    return 0


def _exec(workdir: Path, command: list[str]) -> int:
    """Run ``command`` in the node's namespaces with its kubeconfig and the pinned tools on PATH."""
    env = {
        **os.environ,
        "KUBECONFIG": str(workdir / "kubeconfig"),
        "PATH": f"{default_bin_dir()}:{os.environ.get('PATH', '')}",
    }
    nsenter = [
        "nsenter",
        f"--target={_node_pid(workdir)}",
        "--net",
        "--mount",
        f"--wd={os.getcwd()}",
        "--",
        *command,
    ]
    return subprocess.run(nsenter, env=env, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m streamqueue_harness.node",
        description="Start, use or stop the local control plane with a real node (containerd, kubelet, "
        "kube-scheduler, kube-proxy, cluster DNS) in a network namespace of its own. Needs root, "
        "`make tools` and Debian's containerd, runc and CNI plugins (`make setup`); builds the images "
        "if needed.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start control plane and node in the background")
    up.add_argument("--dir", type=Path, required=True, help="work directory (state, certificates, logs)")
    up.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="how many nodes (each after the first in a network namespace of its own)",
    )
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    down = commands.add_parser("down", help="stop what `up --dir DIR` started and clean the host")
    down.add_argument("--dir", type=Path, required=True)
    run = commands.add_parser("exec", help="run a command inside the node's namespaces")
    run.add_argument("--dir", type=Path, required=True)
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    workdir = args.dir.resolve()
    if args.command == "up":
        return _up(workdir, args.nodes, args.timeout)
    if args.command == "down":
        return _down(workdir)
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return _exec(workdir, command or ["bash"])
