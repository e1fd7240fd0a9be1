"""The chart's values schema, the worker PodMonitor, the NetworkPolicies and NOTES.txt.

The schema is checked by the real helm (template, lint, and install against the local control plane):
a misspelt key fails at the top level and inside the chart's own objects. The PodMonitor and the
worker NetworkPolicy select worker pods by what the operator itself renders into them (labels,
the port serving /metrics), so a rename on either side fails here.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from streamqueue.kubectl_sq.kube import TOOL_REDIS_SECRET
from streamqueue_operator.deployment import render as render_worker
from streamqueue_operator.models import parse_spec

from tests.chart.helm import CHART, KUBE_VERSION, by_kind, helm, render

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
# Misspelt keys, each at another level of the values: helm must refuse every one.
TYPOS = [
    ("logLevl=debug", "'logLevl' not allowed"),
    ("metrics.podMonitor.intervl=1m", "'intervl' not allowed"),
    ("metrics.serviceMonitr.enabled=true", "'serviceMonitr' not allowed"),
    ("networkPolicy.redis.cidr={10.0.0.0/8}", "'cidr' not allowed"),
    ("prometheusRule.alerts.StreamQueueDeadLeters.enabled=false", "StreamQueueDeadLeters"),
    ("replicaCount=two", "want integer"),
    ("networkPolicy.model.cidrs={model.internal}", "does not match pattern"),
]


def _worker_pod(queue: str = "chat") -> dict[str, Any]:
    """The pod template the operator renders for a StreamQueue's workers."""
    owner = {"metadata": {"name": queue, "namespace": "team-a", "uid": "1"}}
    spec = parse_spec({"redis": {"url": "redis://redis:6379/0"}})
    return render_worker(owner, spec, "streamqueue/worker:test")["spec"]["template"]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _declared(schema: dict[str, Any], values: dict[str, Any], path: str = "") -> list[str]:
    """Keys of ``values`` the schema does not declare, where it declares its properties."""
    missing = []
    for key, value in values.items():
        sub = schema.get("properties", {}).get(key)
        if sub is None:
            missing.append(path + key)
        elif isinstance(value, dict) and "properties" in sub:
            missing += _declared(sub, value, f"{path}{key}.")
    return missing


@pytest.mark.parametrize(("setting", "complaint"), TYPOS)
def test_a_typo_fails_helm_template_and_lint(setting: str, complaint: str) -> None:
    for command in (
        ["template", "sq", str(CHART), "--kube-version", KUBE_VERSION, "--set", setting],
        ["lint", str(CHART), "--strict", "--set", setting],
    ):
        result = helm(*command, check=False)
        assert result.returncode != 0, command
        assert complaint in result.stdout + result.stderr, result.stdout + result.stderr


def test_every_value_is_declared_in_the_schema_and_the_defaults_pass() -> None:
    assert _declared(SCHEMA, VALUES) == []
    assert SCHEMA["additionalProperties"] is False
    for owned in ("image", "metrics", "networkPolicy", "prometheusRule", "dashboards", "serviceAccount"):
        assert SCHEMA["properties"][owned]["additionalProperties"] is False, owned
    for extra in ([], ["--set", "networkPolicy.enabled=true", "--set", "metrics.podMonitor.enabled=true"]):
        result = helm("lint", str(CHART), "--strict", *extra, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_knows_exactly_the_alerts_of_the_rules_file() -> None:
    rules = yaml.safe_load((CHART / "alerts" / "streamqueue-rules.yaml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert (
        set(SCHEMA["properties"]["prometheusRule"]["properties"]["alerts"]["propertyNames"]["enum"]) == names
    )


def test_the_pod_monitor_scrapes_the_port_and_pods_the_operator_renders() -> None:
    assert by_kind(render(), "PodMonitor") == []
    (monitor,) = by_kind(render("metrics.podMonitor.enabled=true"), "PodMonitor")
    pod = _worker_pod()
    assert _matches(monitor["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p for p in pod["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    (relabel,) = endpoint["relabelings"]
    [queue_label] = [k for k, v in pod["metadata"]["labels"].items() if v == "chat" and "queue" in k]
    label_name = "".join(c if c.isalnum() else "_" for c in queue_label)  # Prometheus' pod label names
    assert relabel["sourceLabels"] == [f"__meta_kubernetes_pod_label_{label_name}"]
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    (scoped,) = by_kind(render("metrics.podMonitor.enabled=true", "watchNamespaces={team-a}"), "PodMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}


def _policies(*settings: str) -> dict[str, dict[str, Any]]:
    """Rendered NetworkPolicies by ``<namespace>/<name>``."""
    return {
        f"{p['metadata']['namespace']}/{p['metadata']['name']}": p
        for p in by_kind(render("networkPolicy.enabled=true", *settings), "NetworkPolicy")
    }


def _egress(policy: dict[str, Any]) -> list[tuple[set[tuple[str, int]], list[dict[str, Any]] | None]]:
    return [({(p["protocol"], p["port"]) for p in r["ports"]}, r.get("to")) for r in policy["spec"]["egress"]]


def test_network_policies_are_off_by_default_and_select_the_operator_and_the_workers() -> None:
    assert by_kind(render(), "NetworkPolicy") == []
    policies = _policies()
    assert set(policies) == {
        "streamqueue-system/sq-streamqueue-operator",
        "streamqueue-system/sq-streamqueue-operator-workers",
    }
    operator, workers = policies.values()
    (deployment,) = by_kind(render(), "Deployment")
    assert operator["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert _matches(workers["spec"]["podSelector"]["matchLabels"], _worker_pod()["metadata"]["labels"])
    for policy in (operator, workers):
        assert policy["spec"]["policyTypes"] == ["Egress"]  # probes and scrapes (ingress) untouched
    dns = ({("UDP", 53), ("TCP", 53)}, VALUES["networkPolicy"]["dns"]["peers"])
    assert _egress(operator) == [dns, ({("TCP", 443), ("TCP", 6443)}, None), ({("TCP", 6379)}, None)]
    assert _egress(workers) == [dns, ({("TCP", 6379)}, None), ({("TCP", p) for p in (80, 443, 8000)}, None)]


def test_network_policy_destinations_and_worker_namespaces_come_from_the_values() -> None:
    policies = _policies(
        "networkPolicy.apiServer.cidrs={10.0.0.1/32}",
        "networkPolicy.redis.cidrs={10.1.0.0/16,fd00::/8}",
        "networkPolicy.redis.peers[0].podSelector.matchLabels.app=redis",
        "networkPolicy.redis.ports={6379,16379}",
        "networkPolicy.model.cidrs={10.2.0.5/32}",
        "networkPolicy.dns.enabled=false",
        "watchNamespaces={team-a,team-b}",
    )
    assert set(policies) == {
        "streamqueue-system/sq-streamqueue-operator",
        "team-a/sq-streamqueue-operator-workers",
        "team-b/sq-streamqueue-operator-workers",
    }
    redis = ({("TCP", 6379), ("TCP", 16379)}, [
        {"ipBlock": {"cidr": "10.1.0.0/16"}},
        {"ipBlock": {"cidr": "fd00::/8"}},
        {"podSelector": {"matchLabels": {"app": "redis"}}},
    ])  # fmt: skip
    api = ({("TCP", 443), ("TCP", 6443)}, [{"ipBlock": {"cidr": "10.0.0.1/32"}}])
    assert _egress(policies["streamqueue-system/sq-streamqueue-operator"]) == [api, redis]
    model = ({("TCP", p) for p in (80, 443, 8000)}, [{"ipBlock": {"cidr": "10.2.0.5/32"}}])
    assert _egress(policies["team-b/sq-streamqueue-operator-workers"]) == [redis, model]
    chosen = _policies("networkPolicy.workers.namespaces={ai}", "watchNamespaces={team-a}")
    assert set(chosen) == {"streamqueue-system/sq-streamqueue-operator", "ai/sq-streamqueue-operator-workers"}
    assert set(_policies("networkPolicy.workers.enabled=false")) == {
        "streamqueue-system/sq-streamqueue-operator"
    }


@pytest.mark.kube
def test_a_typo_fails_helm_install_and_the_policies_pass_a_server_side_dry_run(
    control_plane, kube_namespace: str
) -> None:
    install = ["install", "sq", str(CHART), "--namespace", kube_namespace, "--dry-run=server"]
    result = helm(*install, "--set", "logLevl=debug", kubeconfig=control_plane.kubeconfig, check=False)
    assert result.returncode != 0 and "'logLevl' not allowed" in result.stderr, result.stdout + result.stderr
    result = helm(*install, "--set", "networkPolicy.enabled=true", kubeconfig=control_plane.kubeconfig)
    assert "kubectl sq status <name>" in result.stdout  # NOTES.txt
    assert f"{TOOL_REDIS_SECRET}=<secret>" in result.stdout  # the annotation kubectl sq reads
    assert "networkPolicy.apiServer.cidrs is empty" in result.stdout
    manifest = helm(
        "template", "sq", str(CHART), "--namespace", kube_namespace, "--kube-version", KUBE_VERSION,
        "--set", "networkPolicy.enabled=true", "--set", "networkPolicy.apiServer.cidrs={10.0.0.1/32}",
        "--set", "networkPolicy.redis.peers[0].podSelector.matchLabels.app=redis",
        "--show-only", "templates/networkpolicy.yaml",
    ).stdout  # fmt: skip
    result = control_plane.dry_run(manifest, kube_namespace)
    assert result.stdout.count("networkpolicy.networking.k8s.io") == 2, result.stdout
