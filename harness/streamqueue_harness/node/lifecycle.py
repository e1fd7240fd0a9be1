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
from ..netns import delete_link
from .containerd import containerd_config, ctr, import_images
from .dns import install_cluster_dns
from .host import cgroup_dirs, clean_host, read_sysctls
from .kube import component_kubeconfig, kubelet_config, proxy_config
from .network import BRIDGE, NODE_IP, add_node_network, write_cni_config
from .prerequisites import check_node_prerequisites

log = logging.getLogger(__name__)

NODE_NAME = "streamqueue-node"
STATE_FILE = "node.json"


class Node:
    """containerd, kubelet, kube-scheduler and kube-proxy joined to ``plane`` (started with ``NODE_IP``),
    with cluster DNS installed."""

    def __init__(
        self,
        plane: ControlPlane,
        workdir: Path,
        images: Images,
        *,
        bin_dir: Path | None = None,
        detach: bool = False,
    ) -> None:
        if plane.node_ip != NODE_IP:
            raise ValueError(f"the control plane must be started with node_ip={NODE_IP!r}")
        self.plane = plane
        self.workdir = Path(workdir).resolve()
        self.images = images
        self.bin_dir = Path(bin_dir) if bin_dir is not None else default_bin_dir()
        self.name = NODE_NAME
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
        try:
            self._start_containerd(deadline)
            import_images(self.socket, self.images.archives, self.images.sandbox)
            self._start_kubernetes_components()
            self._components.wait(deadline, f"node {self.name} Ready and schedulable", self._ready, 0.5)
            install_cluster_dns(self.plane, self.images.coredns, deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        log.info(
            "node %s Ready with cluster DNS in %.1fs (%d images imported)",
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
        write_cni_config(self.workdir / "cni")
        self._components.launch(Path(shutil.which("containerd") or "containerd"), ["--config", str(config)])
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
                    ca_cert=self.plane.pki.ca.cert,
                    socket=self.socket,
                    cgroup_root=self.cgroup_root,
                    pod_logs=self.workdir / "pod-logs",
                )
            )
        )
        self._components.launch(
            self.bin_dir / "kubelet",
            [
                f"--config={config}",
                f"--kubeconfig={self._kubeconfig('kubelet', f'/O=system:nodes/CN=system:node:{self.name}')}",
                f"--root-dir={kubelet_dir / 'root'}",
                f"--hostname-override={self.name}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )
        scheduler = self._kubeconfig("kube-scheduler", "/CN=system:kube-scheduler")
        self._components.launch(
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
        proxy.write_text(yaml.safe_dump(proxy_config(proxy_kubeconfig, self.name)))
        self._components.launch(self.bin_dir / "kube-proxy", [f"--config={proxy}"])

    def _kubeconfig(self, name: str, subject: str) -> Path:
        return component_kubeconfig(self.plane, self.workdir / "pki", name, subject)

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
    images = image_archives()
    add_node_network()
    try:
        with (
            ControlPlane(workdir / "controlplane", node_ip=NODE_IP) as plane,
            Node(plane, workdir / "node", images) as node,
        ):
            yield node
    finally:
        delete_link(BRIDGE)


def stop_node(workdir: Path) -> int:
    """Stop the node recorded in ``workdir`` (from any process); returns how many components were running."""
    facts = recorded_state(workdir, STATE_FILE)
    stopped = stop_recorded(workdir, STATE_FILE, lambda names: [set(names)])
    if facts:
        clean_host(facts)
    return stopped
