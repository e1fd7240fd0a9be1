"""The chart's alert rules and Grafana dashboard, checked with the real promtool and Prometheus.

The rules file is the one the chart's PrometheusRule embeds; the dashboard is the file its ConfigMap
carries. Every expression in both must run on Prometheus (Debian's 2.42 has no parse_query API, so
each one is evaluated), and the dashboard may name only metrics the operator or the worker export.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from streamqueue.metrics import WorkerMetrics
from streamqueue_harness.prometheus import (
    DASHBOARD_FILE,
    RULES_FILE,
    Prometheus,
    dashboard,
    panel_queries,
    promtool,
    rule_groups,
    substitute,
)
from streamqueue_operator import metrics as operator_metrics

from tests.chart.helm import by_kind, render

ALERTS = {
    "StreamQueueBacklogGrowing",
    "StreamQueueRedisUnreachable",
    "StreamQueueDeadLetters",
    "StreamQueueDeadLettersTrimmed",
    "StreamQueueReplicasAtMax",
    "StreamQueueOperatorAPIErrors",
}
VARIABLES = {"namespace": "demo", "queue": "chat", "datasource": ""}
OVERRIDES: dict[str, dict[str, Any]] = {
    "StreamQueueBacklogGrowing": {"for": "5s", "window": "30s", "threshold": 3, "labels": {"team": "ai"}},
    "StreamQueueReplicasAtMax": {"window": "20s"},
    "StreamQueueDeadLetters": {"enabled": False},
}


def check_rules(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )


def helm_overrides(overrides: dict[str, dict[str, Any]]) -> Iterator[str]:
    for alert, change in overrides.items():
        for key, value in change.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    yield f"prometheusRule.alerts.{alert}.{key}.{k}={v}"
            else:
                yield f"prometheusRule.alerts.{alert}.{key}={str(value).lower() if value is False else value}"


def rendered_groups(*set_args: str) -> list[dict[str, Any]]:
    (rule,) = by_kind(render("prometheusRule.enabled=true", *set_args), "PrometheusRule")
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def test_promtool_checks_the_rules_file() -> None:
    result = check_rules(RULES_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_each_alert_is_documented_and_keeps_the_forms_the_chart_changes() -> None:
    (group,) = yaml.safe_load(RULES_FILE.read_text())["groups"]
    assert {r["alert"] for r in group["rules"]} == ALERTS
    for rule in group["rules"]:
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert re.search(r">\s*[0-9.]+\s*$", rule["expr"]), f"{rule['alert']}: no trailing `> threshold`"
        assert re.search(r"\[[0-9]+[smhdwy]\]", rule["expr"]), f"{rule['alert']}: no range to set as window"
        assert re.fullmatch(r"[0-9]+[smh]", rule["for"])
    docs = (RULES_FILE.parents[3] / "docs" / "observability.md").read_text()
    assert all(f"`{alert}`" in docs for alert in ALERTS)


def test_prometheusrule_is_off_by_default() -> None:
    assert by_kind(render(), "PrometheusRule") == []


def test_rendered_prometheusrule_embeds_exactly_the_rules_file() -> None:
    assert rendered_groups() == yaml.safe_load(RULES_FILE.read_text())["groups"]


def test_rendered_overrides_match_the_harness_and_pass_promtool(tmp_path: Path) -> None:
    groups = rendered_groups(*helm_overrides(OVERRIDES), "prometheusRule.labels.release=kps")
    assert groups == rule_groups(overrides=OVERRIDES)
    rules = {r["alert"]: r for r in groups[0]["rules"]}
    assert "StreamQueueDeadLetters" not in rules
    backlog = rules["StreamQueueBacklogGrowing"]
    assert backlog["for"] == "5s"
    assert backlog["expr"] == "deriv(streamqueue_backlog[30s]) > 0 and streamqueue_backlog > 3"
    assert backlog["labels"] == {"severity": "warning", "team": "ai"}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    result = check_rules(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheusrule_namespace_and_labels() -> None:
    (rule,) = by_kind(
        render("prometheusRule.enabled=true", "prometheusRule.namespace=monitoring",
               "prometheusRule.labels.release=kps"),
        "PrometheusRule",
    )  # fmt: skip
    assert rule["metadata"]["namespace"] == "monitoring"
    assert rule["metadata"]["labels"]["release"] == "kps"


def test_dashboard_configmap_is_off_by_default_and_carries_the_file() -> None:
    assert [m for m in by_kind(render(), "ConfigMap") if m["metadata"]["name"].endswith("-dashboard")] == []
    (cm,) = by_kind(render("dashboards.enabled=true"), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "streamqueue-system"
    assert json.loads(cm["data"]["streamqueue.json"]) == json.loads(DASHBOARD_FILE.read_text())
    (cm,) = by_kind(
        render("dashboards.enabled=true", "dashboards.namespace=grafana", "dashboards.label=dash",
               "dashboards.labelValue=yes", "dashboards.annotations.grafana_folder=queues"),
        "ConfigMap",
    )  # fmt: skip
    assert cm["metadata"]["namespace"] == "grafana"
    assert cm["metadata"]["labels"]["dash"] == "yes"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "queues"}


def exported_sample_names() -> set[str]:
    """Every sample name the operator's and a worker's /metrics can show."""
    names = set()
    families = [*REGISTRY.collect(), *WorkerMetrics().registry.collect()]
    assert operator_metrics.BACKLOG in REGISTRY._collector_to_names  # the operator's metrics are registered
    for family in families:
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        else:
            names.add(family.name)
    return names


def test_dashboard_names_only_exported_metrics_and_covers_the_panels() -> None:
    board = dashboard()
    queries = list(panel_queries(board))
    used = {m for _, _, expr in queries for m in re.findall(r"\bstreamqueue_\w+", expr)}
    assert used <= exported_sample_names(), used - exported_sample_names()
    assert {
        "streamqueue_backlog", "streamqueue_lag", "streamqueue_pending", "streamqueue_desired_replicas",
        "streamqueue_ready_replicas", "streamqueue_messages_processed_total",
        "streamqueue_handler_duration_seconds_bucket", "streamqueue_messages_dead_lettered_total",
        "streamqueue_redis_errors_total", "streamqueue_api_errors_total", "streamqueue_scale_events_total",
    } <= used  # fmt: skip
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    alert_metrics = {
        m for g in rule_groups() for r in g["rules"] for m in re.findall(r"\bstreamqueue_\w+", r["expr"])
    }
    assert alert_metrics <= exported_sample_names()


@pytest.fixture(scope="module")
def prometheus() -> Iterator[Prometheus]:
    with Prometheus([], [RULES_FILE]) as prom:
        yield prom


def test_every_panel_query_runs_on_prometheus(prometheus: Prometheus) -> None:
    failures = {}
    for title, ref, expr in panel_queries(dashboard()):
        body = prometheus.api("query", query=substitute(expr, VARIABLES))
        if body.get("status") != "success":
            failures[f"{title} {ref}"] = body.get("error")
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":  # label_values(<selector>, label): the selector must run
            selector = re.fullmatch(r"label_values\((.*), *\w+\)", variable["definition"])
            assert selector is not None
            body = prometheus.api("query", query=substitute(selector.group(1), VARIABLES))
            if body.get("status") != "success":
                failures[f"variable {variable['name']}"] = body.get("error")
    assert failures == {}


def test_every_alert_expression_runs_and_the_rules_load(prometheus: Prometheus) -> None:
    for group in rule_groups():
        for rule in group["rules"]:
            body = prometheus.api("query", query=rule["expr"])
            assert body.get("status") == "success", (rule["alert"], body)

    def evaluated() -> list[dict[str, Any]]:
        rules = [r for g in prometheus.rule_groups() for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else []

    rules = prometheus.wait_for(evaluated, 15, "the rules to be evaluated once")
    assert {r["name"] for r in rules} == ALERTS
    assert {r["health"] for r in rules} == {"ok"}, [(r["name"], r.get("lastError")) for r in rules]
