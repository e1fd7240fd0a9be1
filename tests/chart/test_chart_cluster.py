"""The chart against the real local control plane: server-side dry-run, install, uninstall, RBAC."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.chart.helm import CHART, KUBE_VERSION, helm

pytestmark = pytest.mark.kube

RELEASE = "sq"


def _template(namespace: str, *extra: str) -> str:
    return helm(
        "template", RELEASE, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION, *extra
    ).stdout


def test_rendered_manifests_pass_server_side_dry_run(control_plane, kube_namespace: str) -> None:
    for extra in ([], ["--set", f"watchNamespaces={{{kube_namespace}}}"]):
        result = control_plane.dry_run(_template(kube_namespace, *extra), kube_namespace)
        assert "deployment.apps/sq-streamqueue-operator created (server dry run)" in result.stdout


def _names(control_plane, kind: str, namespace: str | None) -> set[str]:
    args = ["get", kind, "-o", "json", "-l", "app.kubernetes.io/instance=" + RELEASE]
    args += ["-n", namespace] if namespace else []
    return {item["metadata"]["name"] for item in json.loads(control_plane.kubectl(*args).stdout)["items"]}


def test_helm_install_then_uninstall_keeps_only_the_crd(control_plane, kube_namespace: str) -> None:
    kubeconfig = control_plane.kubeconfig
    helm("install", RELEASE, str(CHART), "--namespace", kube_namespace, kubeconfig=kubeconfig)
    try:
        assert _names(control_plane, "deployment", kube_namespace) == {"sq-streamqueue-operator"}
        assert _names(control_plane, "serviceaccount", kube_namespace) == {"sq-streamqueue-operator"}
        assert "sq-streamqueue-operator" in _names(control_plane, "clusterrole", None)
        control_plane.kubectl("get", "crd", "streamqueues.streamqueue.io")
    finally:
        helm("uninstall", RELEASE, "--namespace", kube_namespace, "--wait", kubeconfig=kubeconfig)
    for kind, namespace in [
        ("deployment", kube_namespace),
        ("serviceaccount", kube_namespace),
        ("service", kube_namespace),
        ("clusterrole", None),
        ("clusterrolebinding", None),
    ]:
        assert _names(control_plane, kind, namespace) == set(), kind
    control_plane.kubectl("get", "crd", "streamqueues.streamqueue.io")  # CRDs survive uninstall


def _can_i(kubeconfig: Path, control_plane, *args: str) -> bool:
    result = subprocess.run(
        [str(control_plane.bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig), "auth", "can-i", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.stdout.strip() == "yes"


def test_chart_service_account_is_refused_what_the_chart_does_not_grant(
    control_plane, kube_namespace: str
) -> None:
    control_plane.kubectl(
        "apply",
        "-n",
        kube_namespace,
        "-f",
        "-",
        input=_template(kube_namespace, "--set", f"watchNamespaces={{{kube_namespace}}}"),
    )
    sa = control_plane.serviceaccount_kubeconfig(kube_namespace, "sq-streamqueue-operator")
    ns = ["-n", kube_namespace]
    granted = [
        ("patch", "deployments.apps"),
        ("create", "deployments.apps"),
        ("watch", "streamqueues.streamqueue.io"),
        ("patch", "streamqueues.streamqueue.io", "--subresource=status"),
        ("get", "secrets"),
        ("create", "events"),
        ("list", "pods"),
        ("patch", "pods"),
    ]
    for verb_resource in granted:
        assert _can_i(sa, control_plane, *verb_resource, *ns), verb_resource
    refused = [
        ("delete", "deployments.apps", *ns),
        ("list", "secrets", *ns),
        ("create", "pods", *ns),
        ("get", "pods", *ns),
        ("update", "roles.rbac.authorization.k8s.io", *ns),
        ("get", "deployments.apps", "-n", "default"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("delete", "streamqueues.streamqueue.io", *ns),
    ]
    for verb_resource in refused:
        assert not _can_i(sa, control_plane, *verb_resource), verb_resource
