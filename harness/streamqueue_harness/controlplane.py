"""A real, local Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

The operator is only trustworthy if it is tested against a real apiserver (CRD schema validation,
the status subresource, owner references and garbage collection, RBAC, server-side dry-run). These
machines have no container engine, so this runs the pinned binaries from ``make tools`` directly,
envtest-style, with the controllers the operator relies on. Alone it has no scheduler and no kubelet:
``podrunner.WorkerPodRunner`` stands in for the kubelet where a test needs running processes, and
``node.Node`` joins a real node (containerd, kubelet, kube-scheduler, kube-proxy) to a control plane
started with ``node_ip`` inside the run's private network namespace.

Used by the pytest fixtures, the demo and ``make cluster`` (``python -m streamqueue_harness.controlplane
up|down --dir DIR``). Teardown leaves no process behind: each component leads its own process group,
dies with its parent unless detached, is stopped by ``stop()``/atexit, and ``down`` finds detached
ones through the pid file in the work directory.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import logging
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import kubernetes.client
import kubernetes.config
from kubernetes.client.rest import ApiException

from .components import Components, PortTakenError, StartupError, running_components, stop_recorded
from .eventually import eventually
from .kubeconfig import write_kubeconfig
from .pki import ClusterPKI, create_pki
from .ports import free_port
from .processes import stopped_on_failure

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
CONTROLLERS = (
    "deployment-controller",
    "replicaset-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "clusterrole-aggregation-controller",
    "root-ca-certificate-publisher-controller",
    "disruption-controller",  # PodDisruptionBudget status: the API server's evictions check it
)
# With a real node: the not-ready taint comes off when the kubelet reports Ready, a node that stops
# reporting is tainted and its pods evicted once their toleration runs out, and Services get
# EndpointSlices for kube-proxy.
NODE_CONTROLLERS = (
    "node-lifecycle-controller",
    "taint-eviction-controller",
    "endpointslice-controller",
    "statefulset-controller",
)
# A node whose kubelet stopped renewing its Lease is NotReady (and tainted unreachable) after this,
# instead of the default 50 s, so the tests do not wait the defaults out. It is still longer than the
# operator's lease (3 s): a worker woken right after a node loss may be placed on the dead node, and is
# replaced once the node is NotReady (docs/ha.md, "A node lost"). The kubelets renew every 2.5 s
# (node.kube: nodeLeaseDurationSeconds 10); checked every 2 s, not 5 s.
NODE_MONITOR_ARGS = ("--node-monitor-grace-period=10s", "--node-monitor-period=2s")
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
STATE_FILE = "processes.json"
PORT_ATTEMPTS = 3


class ToolsMissingError(RuntimeError):
    """The pinned binaries are not built; the message tells the user how to build them."""


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call whose message carries kubectl's own explanation (stderr)."""

    def __str__(self) -> str:
        return f"{' '.join(map(str, self.cmd))} failed with {self.returncode}: {(self.stderr or '').strip()}"


def default_bin_dir() -> Path:
    """``$STREAMQUEUE_TOOLS_BIN`` if set, else the repository's ``.tools/bin`` (``make tools``)."""
    return Path(os.environ.get("STREAMQUEUE_TOOLS_BIN") or REPO_ROOT / ".tools" / "bin")


def check_tools(bin_dir: Path) -> None:
    missing = [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if missing:
        raise ToolsMissingError(
            f"Kubernetes tools missing from {bin_dir}: {', '.join(missing)}; run `make tools` "
            "(builds the pinned etcd, kube-apiserver, kube-controller-manager and kubectl)"
        )


@dataclass
class _Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int

    @classmethod
    def choose(cls) -> _Ports:
        return cls(free_port(), free_port(), free_port())


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on free 127.0.0.1 ports under ``workdir``.

    ``detach=True`` lets the processes outlive this Python process (``make cluster``); otherwise
    they are killed with it, whatever way it ends. ``node_ip`` prepares it for ``node.Node``.
    """

    def __init__(
        self, workdir: Path, bin_dir: Path | None = None, *, detach: bool = False, node_ip: str | None = None
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.bin_dir = Path(bin_dir) if bin_dir is not None else default_bin_dir()
        self.detach = detach
        # Set for a control plane that a real node joins: pods reach the apiserver there (through the
        # ``kubernetes`` Service), so it listens on every address of the run's private namespace.
        self.node_ip = node_ip
        self.kubeconfig = self.workdir / "kubeconfig"
        self.server = ""
        self.start_seconds: float | None = None
        self._components = Components(self.workdir, STATE_FILE, detach=detach)
        self._pki: ClusterPKI | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> ControlPlane:
        check_tools(self.bin_dir)
        if running_components(self.workdir, STATE_FILE):
            raise StartupError(f"a control plane is already running from {self.workdir}: run `down` first")
        began = time.monotonic()
        self._prepare_workdir()
        self._pki = create_pki(self.workdir / "pki", (self.node_ip,) if self.node_ip else ())
        if not self.detach:
            atexit.register(self.stop)
        with stopped_on_failure(self.stop):
            for attempt in range(1, PORT_ATTEMPTS + 1):
                try:
                    self._start_components(_Ports.choose(), began + timeout)
                    break
                except PortTakenError as exc:
                    if attempt == PORT_ATTEMPTS:
                        raise
                    log.warning("control plane start attempt %d: %s; retrying with new ports", attempt, exc)
                    self._components.stop(shutdown_phases)
                    # etcd's member records the old ports
                    shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
        self.start_seconds = time.monotonic() - began
        log.info(
            "control plane ready at %s in %.1fs (kubeconfig %s)",
            self.server,
            self.start_seconds,
            self.kubeconfig,
        )
        return self

    @property
    def pki(self) -> ClusterPKI:
        """The cluster's certificates: a node signs its components' client certificates with its CA."""
        assert self._pki is not None, "the control plane is not started"
        return self._pki

    def stop(self) -> None:
        """Stop every component (SIGTERM, SIGKILL after a grace period); safe to call twice."""
        atexit.unregister(self.stop)
        self._components.stop(shutdown_phases)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _prepare_workdir(self) -> None:
        """A fresh cluster each start: old etcd data, certificates and logs would only confuse."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stale in ("etcd", "pki", "logs", "serviceaccounts"):
            shutil.rmtree(self.workdir / stale, ignore_errors=True)

    # ---- components ------------------------------------------------------------------------------

    def _start_components(self, ports: _Ports, deadline: float) -> None:
        pki = self._pki
        assert pki is not None
        self.server = f"https://127.0.0.1:{ports.apiserver}"
        etcd_url = f"http://127.0.0.1:{ports.etcd_client}"
        self.etcd_url = etcd_url  # for tests that check what is stored (etcd's JSON gateway, /v3/kv/range)
        self._launch("etcd", self._etcd_args(ports))
        self._components.wait(deadline, "etcd /health", lambda: _http_ok(f"{etcd_url}/health"))
        self._launch("kube-apiserver", self._apiserver_args(pki, ports.apiserver, etcd_url))
        context = _client_tls(pki)
        self._components.wait(
            deadline, "kube-apiserver /readyz", lambda: _http_ok(f"{self.server}/readyz", context)
        )
        write_kubeconfig(
            self.kubeconfig, server=self.server, ca_cert=pki.ca.cert, user="admin",
            client_cert=pki.admin.cert, client_key=pki.admin.key,
        )  # fmt: skip
        manager_config = write_kubeconfig(
            self.workdir / "pki" / "controller-manager.kubeconfig", server=self.server, ca_cert=pki.ca.cert,
            user="system:kube-controller-manager", client_cert=pki.controller_manager.cert,
            client_key=pki.controller_manager.key,
        )  # fmt: skip
        self._launch("kube-controller-manager", self._controller_manager_args(pki, manager_config))
        with self.api_client() as api:
            core = kubernetes.client.CoreV1Api(api)
            self._components.wait(
                deadline, "system namespaces", lambda: _namespaces_exist(core, SYSTEM_NAMESPACES)
            )
            self._components.wait(
                deadline,
                "the default ServiceAccount",
                lambda: _default_serviceaccount_exists(core, "default"),
            )

    def _launch(self, name: str, args: list[str]) -> None:
        self._components.facts["server"] = self.server
        self._components.launch(self.bin_dir / name, args)

    def _etcd_args(self, ports: _Ports) -> list[str]:
        client = f"http://127.0.0.1:{ports.etcd_client}"
        peer = f"http://127.0.0.1:{ports.etcd_peer}"
        return [
            "--name=default", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--unsafe-no-fsync",  # throwaway data: durability only costs test time
            "--log-level=warn",
        ]  # fmt: skip

    def _apiserver_args(self, pki: ClusterPKI, port: int, etcd_url: str) -> list[str]:
        return [
            f"--etcd-servers={etcd_url}",
            *self._apiserver_address_args(pki), f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'pki'}",
            f"--tls-cert-file={pki.apiserver.cert}", f"--tls-private-key-file={pki.apiserver.key}",
            f"--client-ca-file={pki.ca.cert}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.service_account_public_key}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true",
            "--profiling=false",
        ]  # fmt: skip

    def _apiserver_address_args(self, pki: ClusterPKI) -> list[str]:
        if self.node_ip is None:
            # The "kubernetes" Service's endpoint would be 127.0.0.1, which Endpoints reject; nothing
            # runs in-cluster here, so the reconciler would only log an error every few seconds.
            return [
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
            ]
        # Every address of the private namespace: loopback for the harness, the node IP for pods (the
        # "kubernetes" Service's endpoint). Logs and exec reach the kubelet at its InternalIP.
        return [
            "--bind-address=0.0.0.0", f"--advertise-address={self.node_ip}",
            f"--kubelet-client-certificate={pki.apiserver_kubelet_client.cert}",
            f"--kubelet-client-key={pki.apiserver_kubelet_client.key}",
            "--kubelet-preferred-address-types=InternalIP",
        ]  # fmt: skip

    def _controller_manager_args(self, pki: ClusterPKI, kubeconfig: Path) -> list[str]:
        return [
            f"--kubeconfig={kubeconfig}",
            f"--controllers={','.join(CONTROLLERS + (NODE_CONTROLLERS if self.node_ip else ()))}",
            *(NODE_MONITOR_ARGS if self.node_ip else ()),
            # Each controller acts as its own ServiceAccount, under the RBAC roles a real cluster uses.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.service_account_key}",
            f"--root-ca-file={pki.ca.cert}",
            "--leader-elect=false",
            "--secure-port=0",
        ]

    # ---- clients -----------------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl as cluster admin; failures raise ``KubectlError`` with kubectl's message."""
        cmd = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def wait_established(self, *crds: str, timeout: float = 60.0) -> None:
        """Wait until each CRD (by name) is Established. Not ``kubectl wait --for=condition=...``: run
        right after the apply it can find no ``status.conditions`` yet and fails instead of waiting."""
        path = "jsonpath={.status.conditions[?(@.type=='Established')].status}"

        def established() -> bool:
            states = (self.kubectl("get", f"crd/{c}", "-o", path, check=False).stdout for c in crds)
            return all(state == "True" for state in states)

        eventually(established, f"CRDs {', '.join(crds)} established", timeout=timeout, interval=0.2)

    def dry_run(
        self, manifest: str, namespace: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl apply --dry-run=server``: the API server validates and admits ``manifest`` (YAML,
        one or more documents) through every admission step and persists nothing."""
        scope = ["-n", namespace] if namespace else []
        return self.kubectl("apply", "--dry-run=server", *scope, "-f", "-", input=manifest, check=check)

    def api_client(self) -> kubernetes.client.ApiClient:
        """A Python client authenticated as cluster admin; close it (or use it as a context manager)."""
        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))

    def serviceaccount_kubeconfig(self, namespace: str, name: str, expiration_seconds: int = 3600) -> Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name`` (TokenRequest API).

        RBAC tests use it to see what that account may and may not do.
        """
        pki = self._pki
        assert pki is not None, "the control plane is not started"
        request = kubernetes.client.AuthenticationV1TokenRequest(
            spec=kubernetes.client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
        )
        with self.api_client() as api:
            core = kubernetes.client.CoreV1Api(api)
            status = core.create_namespaced_service_account_token(name, namespace, request).status
        if status is None or not status.token:
            raise RuntimeError(f"the TokenRequest for ServiceAccount {namespace}/{name} returned no token")
        return write_kubeconfig(
            self.workdir / "serviceaccounts" / f"{namespace}.{name}.kubeconfig",
            server=self.server, ca_cert=pki.ca.cert, user=f"system:serviceaccount:{namespace}:{name}",
            token=status.token, namespace=namespace,
        )  # fmt: skip

    def wait_for_default_serviceaccount(self, namespace: str, timeout: float = 30.0) -> None:
        """Wait until the serviceaccount controller has made ``default`` in ``namespace``.

        Until then the ServiceAccount admission plugin rejects Pods there, so a test that creates a
        Deployment right after its namespace would see the ReplicaSet controller back off.
        """
        with self.api_client() as api:
            core = kubernetes.client.CoreV1Api(api)
            exists = functools.partial(_default_serviceaccount_exists, core, namespace)
            eventually(exists, f"the default ServiceAccount in {namespace}", timeout, 0.05, TimeoutError)


def shutdown_phases(names: Sequence[str]) -> list[set[str]]:
    """etcd last: an apiserver that loses its storage mid-shutdown hangs until SIGKILL."""
    return [set(names) - {"etcd"}, {"etcd"}]


def _client_tls(pki: ClusterPKI) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    context.load_cert_chain(str(pki.admin.cert), str(pki.admin.key))
    return context


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _namespaces_exist(core: kubernetes.client.CoreV1Api, names: Sequence[str]) -> bool:
    existing = {ns.metadata.name for ns in core.list_namespace().items if ns.metadata}
    return set(names) <= existing


def _default_serviceaccount_exists(core: kubernetes.client.CoreV1Api, namespace: str) -> bool:
    try:
        core.read_namespaced_service_account("default", namespace)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


# ---- command line -------------------------------------------------------------------------------------


def _up(workdir: Path, bin_dir: Path | None, timeout: float) -> int:
    kubeconfig = workdir / "kubeconfig"
    if running_components(workdir, STATE_FILE):
        print(f"control plane already running; kubectl --kubeconfig {kubeconfig} get ns")
        return 0
    plane = ControlPlane(workdir, bin_dir, detach=True)
    try:
        plane.start(timeout=timeout)
    except (ToolsMissingError, StartupError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"control plane up at {plane.server} in {plane.start_seconds:.1f}s; logs in {workdir / 'logs'}")
    print(f"  kubectl --kubeconfig {kubeconfig} get ns")
    print(f"  stop it with: python -m streamqueue_harness.controlplane down --dir {workdir}")
    return 0


def _down(workdir: Path) -> int:
    stopped = stop_recorded(workdir, STATE_FILE, shutdown_phases)
    print(
        f"stopped {stopped} control-plane process(es) from {workdir}"
        if stopped
        else "no control plane running"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m streamqueue_harness.controlplane",
        description="Start or stop a local Kubernetes control plane (etcd, kube-apiserver, "
        "kube-controller-manager) on free 127.0.0.1 ports, for development and the demo. "
        "Needs the pinned binaries from `make tools`.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start it in the background and write DIR/kubeconfig")
    up.add_argument("--dir", type=Path, required=True, help="work directory (data, certificates, logs, pids)")
    up.add_argument("--bin-dir", type=Path, help="where the binaries are (default: .tools/bin)")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    down = commands.add_parser("down", help="stop the control plane started by `up --dir DIR`")
    down.add_argument("--dir", type=Path, required=True, help="the work directory given to `up`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    workdir = args.dir.resolve()
    if args.command == "up":
        return _up(workdir, args.bin_dir, args.timeout)
    return _down(workdir)


if __name__ == "__main__":
    sys.exit(main())
