"""docs/operator.md covers every StreamQueue field, metric, permission and decision reason (fails when one is
added)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge
from streamqueue_operator import crdgen, metrics, permissions
from streamqueue_operator.decide import HOLDS, Reason

DOC = (Path(__file__).resolve().parents[2] / "docs" / "operator.md").read_text()


def _paths(node: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for name, sub in node.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        out.append(path)
        out += _paths(sub, path)
        if isinstance(sub.get("items"), dict):
            out += _paths(sub["items"], f"{path}[]")
    return out


def test_every_spec_field_is_documented() -> None:
    schema = crdgen.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    missing = [p for p in _paths(schema["properties"]["spec"]) if f"`spec.{p}`" not in DOC]
    assert not missing, f"add these fields to docs/operator.md: {missing}"


def test_every_status_field_is_documented() -> None:
    schema = crdgen.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    fields = [p for p in schema["properties"]["status"]["properties"] if p != "conditions"]
    assert not [f for f in fields if f"`{f}`" not in DOC]


def test_every_metric_and_permission_is_documented() -> None:
    collectors = [c for c in vars(metrics).values() if isinstance(c, Counter | Gauge)]
    names = {m.name for c in collectors for m in c.describe()}
    assert len(names) >= 10
    assert not [n for n in names if f"`{n}" not in DOC], "document every metric in docs/operator.md"
    for _, resource, verbs, _ in permissions.RULES:
        assert f"| `{resource}` | {', '.join(verbs)} |" in DOC, resource


def _listed(pattern: str) -> set[str]:
    """The backquoted names in the part of the doc ``pattern`` matches (across line breaks)."""
    found = re.search(pattern, DOC, re.DOTALL)
    assert found, pattern
    return set(re.findall(r"`(\w+)`", found.group(1)))


def test_every_decision_reason_is_documented() -> None:
    """The reasons are what users see in the Scaling condition, Events and metric labels: the doc's
    list is exactly the enum, and so is its list of the holds whose message says why."""
    assert _listed(r"Decision reasons: (.*?)\. ") == set(Reason)
    assert _listed(r"For the holds \((.*?)\)") == HOLDS
