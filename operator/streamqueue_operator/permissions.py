"""The Kubernetes API calls the operator makes, as RBAC rules: the least privilege it needs.

One list for the chart's Role/ClusterRole, docs/operator.md and the integration test that runs the
operator under exactly these rules (so a new API call without a rule here fails a test).
"""

from __future__ import annotations

from .models import GROUP, PLURAL

# (apiGroup, resource, verbs, why)
RULES: list[tuple[str, str, tuple[str, ...], str]] = [
    (
        GROUP,
        PLURAL,
        ("list", "watch", "patch"),
        "kopf watches StreamQueues; patch adds its finalizer and annotations",
    ),
    (GROUP, f"{PLURAL}/status", ("patch",), "status: conditions, backlog, replicas"),
    (
        "apps",
        "deployments",
        ("get", "list", "watch", "create", "patch"),
        "worker Deployments: create, adopt, scale",
    ),
    (
        "policy",
        "poddisruptionbudgets",
        ("get", "create", "patch"),
        "one PodDisruptionBudget per queue's workers: node drains evict them a few at a time",
    ),
    (
        "",
        "pods",
        ("list", "patch"),
        "dead-consumer cleanup compares consumers with the queue's Pods; "
        "pod-deletion-cost before a scale-down",
    ),
    ("", "secrets", ("get",), "Redis password and CA bundle named by the StreamQueue"),
    ("", "events", ("create",), "Events for scaling and Deployment changes"),
]


def role_rules() -> list[dict[str, list[str]]]:
    """The rules in the shape of a Role's ``rules``."""
    return [{"apiGroups": [g], "resources": [r], "verbs": list(v)} for g, r, v, _ in RULES]
