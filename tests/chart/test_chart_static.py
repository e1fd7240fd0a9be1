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
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
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
    assert sorted(r["metadata"]["namespace"] for r in by_kind(manifests, "Role")) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in by_kind(manifests, "RoleBinding")) == [
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
            assert role["rules"] == role_rules()
