"""The local control plane behaves like a real cluster where the operator depends on it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from streamqueue_harness import controlplane
from streamqueue_harness.controlplane import STATE_FILE, ControlPlane
from streamqueue_harness.eventually import eventually
from streamqueue_harness.ports import free_port

pytestmark = pytest.mark.kube

ROOT = Path(__file__).resolve().parents[2]
GROUP = "harness.streamqueue.test"


def _pinned_kubernetes_version() -> str:
    match = re.search(
        r'KUBERNETES_VERSION="\$\{KUBERNETES_VERSION:-(v[0-9.]+)\}"', (ROOT / "hack/tools.sh").read_text()
    )
    assert match, "hack/tools.sh no longer pins KUBERNETES_VERSION"
    return match.group(1)


def _apply(plane: ControlPlane, *manifests: dict[str, Any], namespace: str | None = None) -> str:
    args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
    return plane.kubectl(*args, input=yaml.safe_dump_all(manifests)).stdout


def _get(plane: ControlPlane, *args: str) -> dict[str, Any] | None:
    result = plane.kubectl("get", *args, "-o", "json", "--ignore-not-found", check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if result.stdout.strip() else None


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive


def _deployment(name: str, labels: dict[str, str], owner: dict[str, Any] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if owner:
        metadata["ownerReferences"] = [owner]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "main", "image": "example.invalid/never-pulled:1"}]},
            },
        },
    }


def test_server_and_clients_report_the_pinned_release(control_plane: ControlPlane) -> None:
    versions = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    pinned = _pinned_kubernetes_version()
    assert versions["serverVersion"]["gitVersion"] == pinned
    assert versions["clientVersion"]["gitVersion"] == pinned
    assert versions["serverVersion"]["minor"] == pinned.split(".")[1]


def test_crd_is_served_with_schema_validation_and_status_subresource(
    control_plane: ControlPlane, kube_namespace: str
) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{
                "name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "required": ["size"],
                             "properties": {"size": {"type": "integer", "minimum": 1}}},
                    "status": {"type": "object", "properties": {"seen": {"type": "integer"}}},
                }}},
            }],
        },
    }  # fmt: skip
    _apply(control_plane, crd)
    try:
        control_plane.wait_established(f"widgets.{GROUP}", timeout=30)
        widget = {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": {"size": 3},
        }
        _apply(control_plane, widget, namespace=kube_namespace)
        invalid = control_plane.kubectl(
            "apply", "-n", kube_namespace, "-f", "-", check=False,
            input=yaml.safe_dump({**widget, "metadata": {"name": "bad"}, "spec": {"size": 0}}),
        )  # fmt: skip
        assert invalid.returncode != 0 and "spec.size" in invalid.stderr, invalid.stderr
        control_plane.kubectl(
            "patch", "widget", "w", "-n", kube_namespace, "--subresource=status", "--type=merge",
            "-p", '{"status": {"seen": 7}}',
        )  # fmt: skip
        stored = _get(control_plane, "widget", "w", "-n", kube_namespace)
        assert stored is not None
        assert stored["spec"] == {"size": 3} and stored["status"] == {"seen": 7}
    finally:
        control_plane.kubectl("delete", "crd", f"widgets.{GROUP}", "--wait=false", check=False)


def test_owned_deployment_is_garbage_collected_with_its_owner(
    control_plane: ControlPlane, kube_namespace: str
) -> None:
    control_plane.kubectl("create", "configmap", "owner", "-n", kube_namespace)
    owner = _get(control_plane, "configmap", "owner", "-n", kube_namespace)
    assert owner is not None
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    _apply(control_plane, _deployment("owned", {"app": "owned"}, reference), namespace=kube_namespace)
    # The deployment controller runs: the Deployment gets its ReplicaSet, owned in turn by it.
    replicasets = eventually(
        lambda: (_get(control_plane, "replicasets", "-n", kube_namespace) or {}).get("items"), "a ReplicaSet"
    )
    assert replicasets[0]["metadata"]["ownerReferences"][0]["name"] == "owned"

    control_plane.kubectl("delete", "configmap", "owner", "-n", kube_namespace)
    eventually(
        lambda: _get(control_plane, "deployment", "owned", "-n", kube_namespace) is None,
        "the GC of the Deployment",
    )
    eventually(
        lambda: not (_get(control_plane, "replicasets", "-n", kube_namespace) or {}).get("items"),
        "the GC of the ReplicaSet",
    )


def test_serviceaccount_token_gets_exactly_what_its_role_grants(
    control_plane: ControlPlane, kube_namespace: str
) -> None:
    ns = kube_namespace
    control_plane.kubectl("create", "serviceaccount", "reader", "-n", ns)
    control_plane.kubectl(
        "create", "role", "read-configmaps", "--verb=get,list", "--resource=configmaps", "-n", ns
    )
    control_plane.kubectl(
        "create", "rolebinding", "reader", "--role=read-configmaps", f"--serviceaccount={ns}:reader", "-n", ns
    )
    control_plane.kubectl("create", "configmap", "visible", "-n", ns)
    token_config = control_plane.serviceaccount_kubeconfig(ns, "reader")

    def as_reader(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(control_plane.bin_dir / "kubectl"), "--kubeconfig", str(token_config), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    whoami = json.loads(as_reader("auth", "whoami", "-o", "json").stdout)
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:reader"
    allowed = as_reader("get", "configmap", "visible", "-n", ns, "-o", "name")
    assert allowed.returncode == 0 and allowed.stdout.strip() == "configmap/visible", allowed.stderr
    for denied in (
        ["get", "secrets", "-n", ns],
        ["create", "configmap", "sneaky", "-n", ns],
        ["delete", "configmap", "visible", "-n", ns],
        ["get", "configmaps", "-n", "default"],
        ["get", "namespaces"],
    ):
        result = as_reader(*denied)
        assert result.returncode != 0 and "forbidden" in result.stderr.lower(), (denied, result.stderr)


def test_server_side_dry_run_validates_without_persisting(
    control_plane: ControlPlane, kube_namespace: str
) -> None:
    manifest = _deployment("dry", {"app": "dry"})
    out = control_plane.dry_run(yaml.safe_dump(manifest), kube_namespace)
    assert "(server dry run)" in out.stdout
    assert _get(control_plane, "deployment", "dry", "-n", kube_namespace) is None

    mismatched = _deployment("dry", {"app": "dry"})
    mismatched["spec"]["template"]["metadata"]["labels"] = {"app": "other"}
    rejected = control_plane.dry_run(yaml.safe_dump(mismatched), kube_namespace, check=False)
    assert rejected.returncode != 0 and "`selector` does not match template" in rejected.stderr, (
        rejected.stderr
    )


def _recorded_pids(workdir: Path) -> list[int]:
    return [int(p["pid"]) for p in json.loads((workdir / STATE_FILE).read_text())["processes"]]


def test_make_cluster_cli_starts_in_the_background_and_down_stops_everything(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    cli = [sys.executable, "-m", "streamqueue_harness.controlplane"]
    up = subprocess.run([*cli, "up", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stderr
    pids = _recorded_pids(tmp_path)
    try:
        assert len(_pids_alive(pids)) == 3
        kubectl = [str(control_plane.bin_dir / "kubectl"), "--kubeconfig", str(tmp_path / "kubeconfig")]
        namespaces = subprocess.run(
            [*kubectl, "get", "ns", "-o", "name"], capture_output=True, text=True, timeout=60
        )
        assert "namespace/kube-system" in namespaces.stdout.split(), namespaces.stderr
        again = subprocess.run(
            [*cli, "up", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60
        )
        assert again.returncode == 0 and "already running" in again.stdout
    finally:
        down = subprocess.run(
            [*cli, "down", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60
        )
    assert down.returncode == 0, down.stderr
    assert _pids_alive(pids) == []


def test_components_die_with_a_killed_test_process(control_plane: ControlPlane, tmp_path: Path) -> None:
    """No Python cleanup runs on SIGKILL; the kernel still takes the control plane down with its owner."""
    script = (
        "import sys, time\nfrom pathlib import Path\n"
        "from streamqueue_harness.controlplane import ControlPlane\n"
        "ControlPlane(Path(sys.argv[1])).start(); print('ready', flush=True); time.sleep(600)"
    )
    owner = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
        pids = _recorded_pids(tmp_path)
        assert len(_pids_alive(pids)) == 3
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    eventually(lambda: _pids_alive(pids) == [], "the orphaned components to die", timeout=10)


def test_a_port_taken_after_it_was_chosen_is_retried_with_new_ports(
    control_plane: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """free_port() races with other processes; losing the race must cost a retry, not the session."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        chosen = iter([squatter.getsockname()[1]])  # etcd's client port: already bound by someone else
        monkeypatch.setattr(controlplane, "free_port", lambda: next(chosen, None) or free_port())
        with ControlPlane(tmp_path) as plane:
            assert (
                plane.kubectl("get", "ns", "kube-system", "-o", "name").stdout.strip()
                == "namespace/kube-system"
            )
    assert "address already in use" in (tmp_path / "logs" / "etcd.log").read_text()
