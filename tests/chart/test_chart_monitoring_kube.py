"""The chart's Prometheus Operator objects (ServiceMonitor, PodMonitor, PrometheusRule) on a real
kube-apiserver that knows the Prometheus Operator's CRDs (v0.85.0's own files, ``hack/tools.sh
prometheus-crds``).

Created for real (server-side apply) with strict field validation: a misspelt or misplaced field is
refused, not pruned in silence as a structural schema would otherwise do, and what is stored is what
was rendered. What they select is asked of the API server's own label selection: the PodMonitor must
select the operator's worker pod (rendered by ``streamqueue_operator.deployment`` for the example
StreamQueue) and name a port of its container, the ServiceMonitor the chart's metrics Service and a
port of it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from streamqueue_harness.controlplane import ControlPlane, KubectlError
from streamqueue_operator.deployment import render as render_deployment
from streamqueue_operator.models import QUEUE_LABEL, parse_spec

from tests.chart.helm import ROOT, render

pytestmark = pytest.mark.kube

CRDS = ROOT / ".tools" / "prometheus-crds"
MONITORING = ("ServiceMonitor", "PodMonitor", "PrometheusRule")
ENABLED = (
    "metrics.serviceMonitor.enabled=true",
    "metrics.podMonitor.enabled=true",
    "prometheusRule.enabled=true",
)
QUEUE = "chat"


@pytest.fixture(scope="module")
def prometheus_crds(control_plane: ControlPlane) -> Iterator[list[str]]:
    """The Prometheus Operator's CRDs, installed for this module's tests and deleted after them."""
    files = sorted(CRDS.glob("monitoring.coreos.com_*.yaml"))
    if len(files) != len(MONITORING):
        raise FileNotFoundError(f"{CRDS} lacks the CRDs: run `bash hack/tools.sh prometheus-crds`")
    names = [yaml.safe_load(f.read_text())["metadata"]["name"] for f in files]
    for f in files:
        control_plane.kubectl("apply", "--server-side", "-f", str(f))
    control_plane.wait_established(*names)
    yield names
    control_plane.kubectl("delete", "crd", *names, "--wait=false", check=False)


def _apply(control_plane: ControlPlane, namespace: str, objects: list[dict[str, Any]]) -> None:
    """Create or update ``objects`` server-side; an unknown or duplicate field is an error (kubectl's
    default validation warns only for a duplicate)."""
    control_plane.kubectl(
        "apply", "--server-side", "--validate=strict", "--field-manager=chart-test",
        "-n", namespace, "-f", "-", input=yaml.safe_dump_all(objects),
    )  # fmt: skip


def _stored(control_plane: ControlPlane, namespace: str, kind: str, name: str) -> dict[str, Any]:
    out = control_plane.kubectl("get", kind.lower(), name, "-n", namespace, "-o", "json").stdout
    stored: dict[str, Any] = json.loads(out)
    return stored


def _monitoring(namespace: str, *extra: str) -> list[dict[str, Any]]:
    manifests = render(*ENABLED, *extra, namespace=namespace)
    objects = [m for m in manifests if m["kind"] in MONITORING]
    assert sorted(m["kind"] for m in objects) == sorted(MONITORING)
    return objects


@pytest.mark.parametrize("watch", [False, True], ids=["all-namespaces", "watch-namespaces"])
def test_the_monitoring_objects_are_created_as_rendered(
    control_plane: ControlPlane, kube_namespace: str, prometheus_crds: list[str], watch: bool
) -> None:
    extra = [f"watchNamespaces={{{kube_namespace}}}"] if watch else []
    alert = "prometheusRule.alerts.StreamQueueDeadLetters.labels.team=ai"  # an override's labels too
    objects = _monitoring(kube_namespace, *extra, alert)
    _apply(control_plane, kube_namespace, objects)
    for rendered in objects:
        stored = _stored(control_plane, kube_namespace, rendered["kind"], rendered["metadata"]["name"])
        assert _kept(rendered["spec"], stored["spec"]), f"{rendered['kind']}: not stored as rendered"


def _kept(rendered: Any, stored: Any) -> bool:
    """Every rendered field is stored with its value: none pruned or changed (the schema's defaults,
    such as a relabeling's ``action: replace``, may be added)."""
    if isinstance(rendered, dict):
        return isinstance(stored, dict) and all(
            k in stored and _kept(v, stored[k]) for k, v in rendered.items()
        )
    if isinstance(rendered, list):
        return isinstance(stored, list) and len(stored) == len(rendered) and all(map(_kept, rendered, stored))
    return bool(rendered == stored)


def test_a_misspelt_field_is_refused_not_pruned(
    control_plane: ControlPlane, kube_namespace: str, prometheus_crds: list[str]
) -> None:
    """What makes the test above mean something: the CRD's schema is enforced, not only stored."""
    [monitor] = [m for m in _monitoring(kube_namespace) if m["kind"] == "PodMonitor"]
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    endpoint["scrapeInterval"] = endpoint.pop("interval")
    with pytest.raises(KubectlError, match=r"podMetricsEndpoints\[0\]\.scrapeInterval: field not declared"):
        _apply(control_plane, kube_namespace, [monitor])


def _worker_pod(namespace: str) -> dict[str, Any]:
    """A pod of the worker Deployment the operator renders for the example StreamQueue (with pod
    labels of its own: the chart's selector must not depend on their absence)."""
    example = yaml.safe_load((ROOT / "examples" / "streamqueue.yaml").read_text())
    example["spec"].setdefault("worker", {})["podLabels"] = {"team": "ai"}
    owner = {"metadata": {"name": QUEUE, "namespace": namespace, "uid": "0000-1"}}
    deployment = render_deployment(owner, parse_spec(example["spec"]), "streamqueue-worker:dev")
    template = deployment["spec"]["template"]
    metadata = {"name": f"{QUEUE}-worker-0", **template["metadata"]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def _selected(
    control_plane: ControlPlane, kind: str, namespace: str, match_labels: dict[str, str]
) -> set[str]:
    selector = ",".join(f"{k}={v}" for k, v in match_labels.items())
    out = control_plane.kubectl("get", kind, "-n", namespace, "-l", selector, "-o", "json").stdout
    return {item["metadata"]["name"] for item in json.loads(out)["items"]}


def _meta_label(label: str) -> str:
    """Prometheus's ``__meta_kubernetes_pod_label_<name>``: the label with every other character as ``_``."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)


def test_the_pod_monitor_selects_the_operators_worker_pods_and_their_port(
    control_plane: ControlPlane, kube_namespace: str, prometheus_crds: list[str]
) -> None:
    _apply(
        control_plane, kube_namespace, _monitoring(kube_namespace, f"watchNamespaces={{{kube_namespace}}}")
    )
    pod = _worker_pod(kube_namespace)
    _apply(control_plane, kube_namespace, [pod])
    monitor = _stored(control_plane, kube_namespace, "PodMonitor", "sq-streamqueue-operator-workers")["spec"]
    assert monitor["namespaceSelector"] == {"matchNames": [kube_namespace]}
    assert _selected(control_plane, "pods", kube_namespace, monitor["selector"]["matchLabels"]) == {
        pod["metadata"]["name"]
    }
    stored = _stored(control_plane, kube_namespace, "Pod", pod["metadata"]["name"])
    [container] = stored["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for endpoint in monitor["podMetricsEndpoints"]:
        assert endpoint["port"] in ports, f"no container port named {endpoint['port']}: {ports}"
        [relabel] = endpoint["relabelings"]
        assert relabel["sourceLabels"] == [_meta_label(QUEUE_LABEL)]
        assert stored["metadata"]["labels"][QUEUE_LABEL] == QUEUE


def test_the_service_monitor_selects_the_metrics_service_and_its_port(
    control_plane: ControlPlane, kube_namespace: str, prometheus_crds: list[str]
) -> None:
    manifests = render(*ENABLED, namespace=kube_namespace)
    services = [m for m in manifests if m["kind"] == "Service"]
    _apply(
        control_plane, kube_namespace, [*services, *(m for m in manifests if m["kind"] == "ServiceMonitor")]
    )
    monitor = _stored(control_plane, kube_namespace, "ServiceMonitor", "sq-streamqueue-operator")["spec"]
    [name] = _selected(control_plane, "services", kube_namespace, monitor["selector"]["matchLabels"])
    service = _stored(control_plane, kube_namespace, "Service", name)
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["endpoints"]} <= ports, ports


def test_the_gateway_service_monitor_is_created_and_selects_the_gateway_service(
    control_plane: ControlPlane, kube_namespace: str, prometheus_crds: list[str]
) -> None:
    manifests = render(*ENABLED, "gateway.enabled=true", namespace=kube_namespace)
    objects = [m for m in manifests if m["metadata"]["name"].endswith("-gateway")]
    [rendered] = [m for m in objects if m["kind"] == "ServiceMonitor"]
    _apply(control_plane, kube_namespace, [m for m in objects if m["kind"] in ("Service", "ServiceMonitor")])
    monitor = _stored(control_plane, kube_namespace, "ServiceMonitor", rendered["metadata"]["name"])["spec"]
    assert _kept(rendered["spec"], monitor)
    [name] = _selected(control_plane, "services", kube_namespace, monitor["selector"]["matchLabels"])
    service = _stored(control_plane, kube_namespace, "Service", name)
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}


def test_the_crds_are_the_pinned_release(prometheus_crds: list[str]) -> None:
    pinned = re.search(r"PROMETHEUS_OPERATOR_VERSION:-v([0-9.]+)", (ROOT / "hack" / "tools.sh").read_text())
    assert pinned
    for f in Path(CRDS).glob("*.yaml"):
        annotations = yaml.safe_load(f.read_text())["metadata"]["annotations"]
        assert annotations["operator.prometheus.io/version"] == pinned.group(1), f.name
