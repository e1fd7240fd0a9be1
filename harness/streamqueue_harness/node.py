"""A real Kubernetes node beside the local control plane: containerd, kubelet, kube-scheduler, kube-proxy.

Pods run from images built here (no registry is reachable, so the images, including the sandbox
image, are imported into containerd from archives). The design keeps every byte of node traffic
inside the run's own network namespace (``netns``): a bridge there carries the node IP and the pod
subnet, the bridge CNI plugin wires each pod to it, and kube-proxy (iptables mode) makes the
``kubernetes`` Service reach the apiserver, so in-cluster clients (the operator) work unchanged.
Nothing is routed off the namespace, and pods see no DNS server.

This machine lacks CAP_SYS_RESOURCE and runs cgroup v1, which decides parts of the configuration:
containerd restricts ``oom_score_adj`` and skips hugetlb, the kubelet keeps its own OOM score,
tolerates cgroup v1 and swap. The kubelet sets a few global kernel sysctls at start (it has no
user-namespace mode here); their values are recorded first and restored on teardown.

Teardown (``stop``, or ``down`` from another process) stops the components, kills what is left in the
pods' cgroups and containerd's shims, removes the cgroups and restores the sysctls. Mounts and
network devices need no cleanup: they live in the run's namespaces, which vanish with it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import kubernetes.client
import yaml

from .components import Components, StartupError, recorded_state, running_components, stop_recorded
from .controlplane import STATE_FILE as CONTROL_PLANE_STATE
from .controlplane import ControlPlane, ToolsMissingError, check_tools, default_bin_dir
from .controlplane import shutdown_phases as control_plane_phases
from .eventually import eventually
from .images import ImagesMissingError, image_archives
from .kubeconfig import write_kubeconfig
from .netns import NamespaceError, add_bridge, delete_link, enter_private_namespaces, in_private_namespaces
from .pki import signed_certificate
from .ports import free_port

log = logging.getLogger(__name__)

NODE_NAME = "streamqueue-node"
BRIDGE = "sq0"
POD_SUBNET = "10.244.0.0/24"
NODE_IP = "10.244.0.1"  # on the bridge: the pods' gateway, the kubelet's and the apiserver's address
BINARIES = ("kubelet", "kube-scheduler", "kube-proxy")
HOST_PROGRAMS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip", "iptables")
CNI_BIN_DIR = Path("/usr/lib/cni")
STATE_FILE = "node.json"
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


class Node:
    """containerd, kubelet, kube-scheduler and kube-proxy joined to ``plane`` (started with ``NODE_IP``)."""

    def __init__(
        self,
        plane: ControlPlane,
        workdir: Path,
        images: Sequence[Path],
        sandbox_image: str,
        *,
        bin_dir: Path | None = None,
        detach: bool = False,
    ) -> None:
        if plane.node_ip != NODE_IP:
            raise ValueError(f"the control plane must be started with node_ip={NODE_IP!r}")
        self.plane = plane
        self.workdir = Path(workdir).resolve()
        self.images = list(images)
        self.sandbox_image = sandbox_image
        self.bin_dir = Path(bin_dir) if bin_dir is not None else default_bin_dir()
        self.name = NODE_NAME
        self.socket = self.workdir / "containerd" / "containerd.sock"
        # One cgroup subtree per node directory: two runs on one machine never share pods' cgroups.
        self.cgroup_root = "/streamqueue-" + hashlib.sha256(bytes(self.workdir)).hexdigest()[:12]
        self.start_seconds: float | None = None
        self._components = Components(self.workdir, STATE_FILE, detach=detach)

    # ---- lifecycle -------------------------------------------------------------------------------

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
            self._import_images()
            self._start_kubernetes_components()
            self._components.wait(deadline, f"node {self.name} Ready and schedulable", self._ready, 0.5)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        log.info(
            "node %s Ready in %.1fs (%d images imported)", self.name, self.start_seconds, len(self.images)
        )
        return self

    def stop(self) -> None:
        """Stop every component, kill what the pods left, restore the host; safe to call twice."""
        facts = dict(self._components.facts)
        self._components.stop(lambda names: [set(names)])
        if facts:
            _clean_host(facts)
        self._components.facts.clear()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- containerd --------------------------------------------------------------------------------

    def _start_containerd(self, deadline: float) -> None:
        config = self.workdir / "containerd" / "config.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(containerd_config(self.workdir, self.socket, self.sandbox_image))
        write_cni_config(self.workdir / "cni")
        self._components.launch(Path(shutil.which("containerd") or "containerd"), ["--config", str(config)])
        self._components.wait(
            deadline, "containerd", lambda: self._ctr("version", check=False).returncode == 0
        )

    def _ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        cmd = ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise StartupError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
        return result

    def _import_images(self) -> None:
        for archive in self.images:
            log.info("importing %s into containerd", archive.name)
            self._ctr("images", "import", str(archive))
        names = set(self._ctr("images", "list", "--quiet").stdout.split())
        if self.sandbox_image not in names:
            raise StartupError(
                f"the sandbox image {self.sandbox_image} is not among the imported images {names}"
            )

    # ---- kubelet, kube-scheduler, kube-proxy -----------------------------------------------------------

    def _start_kubernetes_components(self) -> None:
        for tree in cgroup_dirs(self.cgroup_root):
            tree.mkdir(exist_ok=True)
        kubelet_dir = self.workdir / "kubelet"
        kubelet_dir.mkdir(parents=True, exist_ok=True)
        config = kubelet_dir / "config.yaml"
        config.write_text(yaml.safe_dump(self._kubelet_config()))
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
        proxy_config = self.workdir / "kube-proxy.yaml"
        proxy_config.write_text(yaml.safe_dump(self._proxy_config()))
        self._components.launch(self.bin_dir / "kube-proxy", [f"--config={proxy_config}"])

    def _kubeconfig(self, name: str, subject: str) -> Path:
        """A client certificate from the cluster CA: its subject is what RBAC and the Node authorizer see."""
        pki_dir = self.workdir / "pki"
        pki_dir.mkdir(parents=True, exist_ok=True)
        pki = self.plane.pki
        cert = signed_certificate(pki_dir, pki.ca, name, subject, "clientAuth")
        return write_kubeconfig(
            pki_dir / f"{name}.kubeconfig",
            server=self.plane.server,
            ca_cert=pki.ca.cert,
            user=subject.rsplit("CN=", 1)[-1],
            client_cert=cert.cert,
            client_key=cert.key,
        )

    def _kubelet_config(self) -> dict[str, Any]:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,  # logs and exec: the apiserver calls the kubelet at its InternalIP
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.plane.pki.ca.cert)},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "failCgroupV1": False,
            "failSwapOn": False,
            "oomScoreAdj": 0,  # lowering it needs CAP_SYS_RESOURCE, which this VM lacks
            "podLogsDir": str(self.workdir / "pod-logs"),
            "resolvConf": "",  # pods get no DNS server: nothing they could reach, and nothing to leak to
            "serializeImagePulls": False,
            # Images cannot be pulled again here: never collect them, and evict only when truly short.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "staticPodPath": "",
            "shutdownGracePeriod": "0s",
        }

    def _proxy_config(self) -> dict[str, Any]:
        kubeconfig = self._kubeconfig("kube-proxy", "/CN=system:kube-proxy")
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": self.name,
            "clusterCIDR": POD_SUBNET,
            "bindAddress": NODE_IP,
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "nodePortAddresses": [f"{NODE_IP}/32"],
            "iptables": {"localhostNodePorts": False},  # would set route_localnet; nothing here needs it
            # Zero leaves the global conntrack sysctls as they are.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        }

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
    add_bridge(BRIDGE, f"{NODE_IP}/24")
    try:
        with (
            ControlPlane(workdir / "controlplane", node_ip=NODE_IP) as plane,
            Node(plane, workdir / "node", images.archives, images.sandbox) as node,
        ):
            yield node
    finally:
        delete_link(BRIDGE)


# ---- configuration files ------------------------------------------------------------------------------


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


def write_cni_config(directory: Path) -> Path:
    """One bridge network: pods get addresses of ``POD_SUBNET`` with the node IP as their gateway."""
    conf_dir = directory / "net.d"
    conf_dir.mkdir(parents=True, exist_ok=True)
    network = {
        "cniVersion": "0.4.0",
        "name": "streamqueue",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "isDefaultGateway": True,  # Service IPs route to the node, where kube-proxy translates them
                "ipMasq": False,  # nothing to masquerade to: no route leaves the namespace
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP, "rangeStart": "10.244.0.10"}]],
                    "dataDir": str(directory / "ipam"),
                },
            }
        ],
    }
    path = conf_dir / "10-streamqueue.conflist"
    path.write_text(json.dumps(network, indent=2) + "\n")
    return path


# ---- host state: sysctls, cgroups, leftover processes ------------------------------------------------


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


def _clean_host(facts: dict[str, Any]) -> None:
    """After the components stopped: no pod process, shim, cgroup or changed sysctl is left."""
    trees = cgroup_dirs(facts["cgroup_root"])
    _kill_cgroup_processes(trees)
    _kill_shims(facts["containerd"])
    _remove_cgroups(trees)
    restore_sysctls(facts["sysctls"])


def stop_node(workdir: Path) -> int:
    """Stop the node recorded in ``workdir`` (from any process); returns how many components were running."""
    facts = recorded_state(workdir, STATE_FILE)
    stopped = stop_recorded(workdir, STATE_FILE, lambda names: [set(names)])
    if facts:
        _clean_host(facts)
    return stopped


# ---- command line: `make node`, `make cluster-down` -------------------------------------------------------


def _node_pid(workdir: Path) -> int:
    processes = running_components(workdir, CONTROL_PLANE_STATE)
    if not processes:
        raise NodeError(f"no node running from {workdir}: run `make node`")
    return int(processes[0]["pid"])


def _up(workdir: Path, timeout: float) -> int:
    if running_components(workdir, STATE_FILE):
        print(f"node already running: python -m streamqueue_harness.node exec --dir {workdir} -- bash")
        return 0
    try:
        check_tools(default_bin_dir())
        images = image_archives(workdir / "images")
        enter_private_namespaces()
        add_bridge(BRIDGE, f"{NODE_IP}/24")
        plane = ControlPlane(workdir, detach=True, node_ip=NODE_IP).start(timeout=timeout)
        node = Node(plane, workdir / "node", images.archives, images.sandbox, detach=True).start(
            timeout=timeout
        )
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
        if not running_components(workdir / "node", STATE_FILE):
            stop_recorded(workdir, CONTROL_PLANE_STATE, control_plane_phases)
    print(f"node {node.name} Ready in {node.start_seconds:.1f}s beside the control plane at {plane.server}")
    print("  it lives in a network namespace of its own; run commands there with:")
    print(f"  python -m streamqueue_harness.node exec --dir {workdir} -- kubectl get nodes -o wide")
    print("  stop it with: make cluster-down")
    return 0


def _down(workdir: Path) -> int:
    node = stop_node(workdir / "node")
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
        "kube-scheduler, kube-proxy) in a network namespace of its own. Needs root, `make tools` and "
        "Debian's containerd, runc and CNI plugins (`make setup`); builds the images if needed.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start control plane and node in the background")
    up.add_argument("--dir", type=Path, required=True, help="work directory (state, certificates, logs)")
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
        return _up(workdir, args.timeout)
    if args.command == "down":
        return _down(workdir)
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return _exec(workdir, command or ["bash"])


if __name__ == "__main__":
    sys.exit(main())
