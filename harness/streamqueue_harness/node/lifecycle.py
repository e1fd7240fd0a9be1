"""The node's lifecycle: start containerd, import the images, start kubelet, kube-scheduler and kube-proxy,
install cluster DNS; stop it all and clean the host, from this process or another one."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import kubernetes.client
import yaml

from ..components import Components, StartupError, recorded_state, running_components, stop_recorded
from ..controlplane import ControlPlane, default_bin_dir
from ..images import Images, image_archives
from ..netns import delete_link, in_namespace
from ..processes import stopped_on_failure
from .containerd import containerd_config, ctr, import_images
from .dns import install_cluster_dns
from .host import cgroup_dirs, clean_host, read_sysctls
from .kube import component_kubeconfig, kubelet_config, proxy_config
from .network import (
    FIRST,
    NODE_IP,
    NodeNetwork,
    add_joined_node_network,
    add_node_network,
    remove_joined_node_network,
    write_cni_config,
)
from .prerequisites import check_node_prerequisites

log = logging.getLogger(__name__)

NODE_NAME = "streamqueue-node"
STATE_FILE = "node.json"


def node_name(network: NodeNetwork) -> str:
    """``streamqueue-node`` for the first node, ``streamqueue-node-2`` and on for the others."""
    return NODE_NAME if network == FIRST else f"{NODE_NAME}-{network.index + 1}"


class Node:
    """containerd, kubelet and kube-proxy joined to ``plane`` (started with ``NODE_IP``).

    The first node (``network`` = ``FIRST``) lives in the run's namespace beside the control plane and
    also runs the cluster's kube-scheduler and installs cluster DNS. Any other node runs in a network
    namespace of its own (bound on ``workdir/netns``, made by ``network.add_joined_node_network``),
    reaching the API server at the first node's IP.
    """

    def __init__(
        self,
        plane: ControlPlane,
        workdir: Path,
        images: Images,
        *,
        bin_dir: Path | None = None,
        detach: bool = False,
        network: NodeNetwork = FIRST,
    ) -> None:
        if plane.node_ip != NODE_IP:
            raise ValueError(f"the control plane must be started with node_ip={NODE_IP!r}")
        self.plane = plane
        self.workdir = Path(workdir).resolve()
        self.images = images
        self.bin_dir = Path(bin_dir) if bin_dir is not None else default_bin_dir()
        self.network = network
        self.name = node_name(network)
        self.first = network == FIRST
        # None: the run's own namespace. The file is bound by add_joined_node_network before start().
        self.namespace = None if self.first else self.workdir / "netns"
        self.socket = self.workdir / "containerd" / "containerd.sock"
        # One cgroup subtree per node directory: two runs on one machine never share pods' cgroups.
        self.cgroup_root = "/streamqueue-" + hashlib.sha256(bytes(self.workdir)).hexdigest()[:12]
        self.start_seconds: float | None = None
        self._components = Components(self.workdir, STATE_FILE, detach=detach)

    def start(self, timeout: float = 180.0) -> Node:
        check_node_prerequisites(self.bin_dir)
        if running_components(self.workdir, STATE_FILE):
            raise StartupError(f"a node is already running from {self.workdir}: run `down` first")
        began = time.monotonic()
        deadline = began + timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stale in ("containerd", "kubelet", "cni", "logs", "pod-logs"):
            shutil.rmtree(self.workdir / stale, ignore_errors=True)
        self._components.facts.update(
            sysctls=read_sysctls(), cgroup_root=self.cgroup_root, containerd=str(self.socket)
        )
        self._components.write_state()
        with stopped_on_failure(self.stop):
            self._start_containerd(deadline)
            import_images(self.socket, self.images.archives, self.images.sandbox)
            self._start_kubernetes_components()
            self._components.wait(deadline, f"node {self.name} Ready and schedulable", self._ready, 0.5)
            if self.first:
                install_cluster_dns(self.plane, self.images.coredns, deadline - time.monotonic())
        self.start_seconds = time.monotonic() - began
        log.info(
            "node %s Ready in %.1fs (%d images imported)",
            self.name, self.start_seconds, len(self.images.archives),
        )  # fmt: skip
        return self

    def stop(self) -> None:
        """Stop every component, kill what the pods left, restore the host; safe to call twice."""
        facts = dict(self._components.facts)
        self._components.stop(lambda names: [set(names)])
        if facts:
            clean_host(facts)
        self._components.facts.clear()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_containerd(self, deadline: float) -> None:
        config = self.workdir / "containerd" / "config.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(containerd_config(self.workdir, self.socket, self.images.sandbox))
        write_cni_config(self.workdir / "cni", self.network)
        self._launch(Path(shutil.which("containerd") or "containerd"), ["--config", str(config)])
        self._components.wait(
            deadline, "containerd", lambda: ctr(self.socket, "version", check=False).returncode == 0
        )

    def _start_kubernetes_components(self) -> None:
        for tree in cgroup_dirs(self.cgroup_root):
            tree.mkdir(exist_ok=True)
        kubelet_dir = self.workdir / "kubelet"
        kubelet_dir.mkdir(parents=True, exist_ok=True)
        config = kubelet_dir / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                kubelet_config(
                    node_ip=self.network.node_ip,
                    ca_cert=self.plane.pki.ca.cert,
                    socket=self.socket,
                    cgroup_root=self.cgroup_root,
                    pod_logs=self.workdir / "pod-logs",
                )
            )
        )
        self._launch(
            self.bin_dir / "kubelet",
            [
                f"--config={config}",
                f"--kubeconfig={self._kubeconfig('kubelet', f'/O=system:nodes/CN=system:node:{self.name}')}",
                f"--root-dir={kubelet_dir / 'root'}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.network.node_ip}",
                "--v=1",
            ],
        )
        if self.first:  # one scheduler for the cluster, beside the control plane
            scheduler = self._kubeconfig("kube-scheduler", "/CN=system:kube-scheduler")
            self._launch(
                self.bin_dir / "kube-scheduler",
                [
                    f"--kubeconfig={scheduler}",
                    "--secure-port=0",
                    "--bind-address=127.0.0.1",
                    "--leader-elect=false",
                ],
            )
        proxy = self.workdir / "kube-proxy.yaml"
        proxy_kubeconfig = self._kubeconfig("kube-proxy", "/CN=system:kube-proxy")
        proxy.write_text(yaml.safe_dump(proxy_config(proxy_kubeconfig, self.name, self.network.node_ip)))
        self._launch(self.bin_dir / "kube-proxy", [f"--config={proxy}"])

    def _launch(self, binary: Path, args: list[str]) -> None:
        """Start a component in this node's network namespace (the run's own for the first node)."""
        self._components.launch(binary, args, prefix=in_namespace(self.namespace))

    def _kubeconfig(self, name: str, subject: str) -> Path:
        """The first node reaches the API server on loopback; the others at its address, the node IP
        of the first node (the apiserver's certificate names it)."""
        port = self.plane.server.rsplit(":", 1)[1]
        server = None if self.first else f"https://{NODE_IP}:{port}"
        return component_kubeconfig(self.plane, self.workdir / "pki", name, subject, server)

    def _ready(self) -> bool:
        """Ready, and untainted by the node-lifecycle controller: the scheduler will place pods on it."""
        with self.plane.api_client() as api:
            try:
                node = kubernetes.client.CoreV1Api(api).read_node(self.name)
            except kubernetes.client.ApiException as exc:
                if exc.status == 404:
                    return False
                raise
        conditions = node.status.conditions if node.status else None
        ready = any(c.type == "Ready" and c.status == "True" for c in conditions or [])
        return ready and not (node.spec and node.spec.taints)


@contextlib.contextmanager
def running_node(workdir: Path, timeout: float = 180.0) -> Iterator[Node]:
    """The images exported, the bridge, a control plane with the node IP and the node; all stopped after.

    The caller runs in the run's private namespaces (``netns.enter_private_namespaces``).
    """
    with running_cluster(workdir, 1, timeout) as nodes:
        yield nodes[0]


@contextlib.contextmanager
def running_cluster(workdir: Path, nodes: int, timeout: float = 180.0) -> Iterator[list[Node]]:
    """A control plane with ``nodes`` nodes (the first in this namespace, each other one in its own),
    all from the same image archives; everything stopped and unwired after, the last node first."""
    images = image_archives()
    add_node_network()
    started: list[Node] = []
    try:
        with ControlPlane(workdir / "controlplane", node_ip=NODE_IP) as plane:
            try:
                for index in range(nodes):
                    started.append(start_node(plane, workdir, images, index, timeout=timeout))
                yield started
            finally:
                for node in reversed(started):  # each restores the sysctls it found: the first's last
                    node.stop()
    finally:
        for index in range(1, nodes):
            remove_joined_node_network(NodeNetwork(index), node_dir(workdir, index) / "netns")
        delete_link(FIRST.bridge)


def node_dir(workdir: Path, index: int) -> Path:
    """``workdir/node`` for the first node (as before), ``workdir/node-2`` and on for the others."""
    return workdir / ("node" if index == 0 else f"node-{index + 1}")


def start_node(
    plane: ControlPlane, workdir: Path, images: Images, index: int, *, detach: bool = False, timeout: float
) -> Node:
    """Node ``index`` joined to ``plane``; a node after the first gets its network namespace first."""
    node = Node(plane, node_dir(workdir, index), images, detach=detach, network=NodeNetwork(index))
    if node.namespace is not None:
        add_joined_node_network(node.network, node.namespace)
    return node.start(timeout=timeout)


def stop_node(workdir: Path) -> int:
    """Stop the node recorded in ``workdir`` (from any process); returns how many components were running."""
    facts = recorded_state(workdir, STATE_FILE)
    stopped = stop_recorded(workdir, STATE_FILE, lambda names: [set(names)])
    if facts:
        clean_host(facts)
    return stopped
