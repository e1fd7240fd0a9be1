"""The chart without a cluster: lint, security defaults, least-privilege RBAC, one version source."""

from __future__ import annotations

import tomllib

import pytest
import streamqueue
import streamqueue_operator
import yaml

from tests.chart.helm import CHART, ROOT, by_kind, helm, render


def test_helm_lint_passes_for_cluster_wide_and_namespaced_installs() -> None:
    for extra in (
        [],
        ["--set", "watchNamespaces={team-a,team-b}"],
        ["--set", "metrics.serviceMonitor.enabled=true"],
    ):
        result = helm("lint", str(CHART), "--strict", *extra, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def test_versions_come_from_one_place() -> None:
    version = (ROOT / "VERSION").read_text().strip()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == version
    assert chart["appVersion"] == version
    for package in ("worker", "operator", "harness"):
        project = tomllib.loads((ROOT / package / "pyproject.toml").read_text())["project"]
        assert project["version"] == version, package
    assert streamqueue.__version__ == streamqueue_operator.__version__ == version  # from the metadata


def test_operator_pod_is_locked_down() -> None:
    (deployment,) = by_kind(render(), "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["image"] == f"streamqueue/operator:{(ROOT / 'VERSION').read_text().strip()}"


def test_two_replicas_on_different_nodes_with_a_disruption_budget_and_a_short_node_loss_toleration() -> None:
    manifests = render()
    (deployment,) = by_kind(manifests, "Deployment")
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    assert spec["replicas"] == 2 and spec["strategy"]["type"] == "RollingUpdate"
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    lost = {t["key"]: t["tolerationSeconds"] for t in pod["tolerations"] if t["effect"] == "NoExecute"}
    assert lost == {"node.kubernetes.io/not-ready": 30, "node.kubernetes.io/unreachable": 30}
    env = {
        e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        for e in pod["containers"][0]["env"]
    }
    assert env["POD_NAME"] == "metadata.name" and env["POD_NAMESPACE"] == "metadata.namespace"
    (pdb,) = by_kind(manifests, "PodDisruptionBudget")
    assert (
        pdb["spec"]["maxUnavailable"] == 1
        and pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    )
    single = render("leaderElection.enabled=false")
    (deployment,) = by_kind(single, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert "--no-leader-election" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def test_the_lease_role_is_its_own_namespace_and_lease_only() -> None:
    (role,) = [
        r
        for r in by_kind(render("watchNamespaces={team-a}"), "Role")
        if r["metadata"]["name"].endswith("-leader-election")
    ]
    assert role["metadata"]["namespace"] == "streamqueue-system"
    leases = [r for r in role["rules"] if r["resources"] == ["leases"]]
    assert leases == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["sq-streamqueue-operator"],
            "verbs": ["get", "update"],
        },
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["create"],
        },  # create: no name yet
    ]


def _leader(manifest: dict) -> bool:
    return manifest["metadata"]["name"].endswith("-leader-election")


def _rules(manifests: list[dict]) -> list[dict]:
    return [rule for m in manifests if m["kind"] in ("ClusterRole", "Role") for rule in m["rules"]]


def test_rbac_has_no_wildcards_and_no_destructive_verbs() -> None:
    rules = _rules(render())
    assert rules
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"]), (
            rule
        )
    secrets = [r for r in rules if "secrets" in r["resources"]]
    assert secrets and all(r["verbs"] == ["get"] for r in secrets), "secrets: get only, never list/watch"


def test_watch_namespaces_gives_roles_in_those_namespaces_only() -> None:
    manifests = render("watchNamespaces={team-a,team-b}")
    assert not by_kind(manifests, "ClusterRole") and not by_kind(manifests, "ClusterRoleBinding")
    roles, bindings = by_kind(manifests, "Role"), by_kind(manifests, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles if not _leader(r)) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings if not _leader(b)) == [
        "team-a",
        "team-b",
    ]
    (deployment,) = by_kind(manifests, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


@pytest.mark.parametrize("enabled", [False, True])
def test_service_monitor_is_optional(enabled: bool) -> None:
    manifests = render(f"metrics.serviceMonitor.enabled={str(enabled).lower()}")
    assert bool(by_kind(manifests, "ServiceMonitor")) is enabled
    for monitor in by_kind(manifests, "ServiceMonitor"):  # the queue's own namespace/name labels stay
        assert all(endpoint["honorLabels"] is True for endpoint in monitor["spec"]["endpoints"])


def test_chart_rbac_is_exactly_the_operators_permission_list() -> None:
    from streamqueue_operator.permissions import role_rules

    for manifests in (render(), render("watchNamespaces={team-a}")):
        for role in by_kind(manifests, "ClusterRole") + by_kind(manifests, "Role"):
            assert _leader(role) or role["rules"] == role_rules()
