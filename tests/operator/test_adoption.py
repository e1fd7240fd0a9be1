"""Adopting an existing worker Deployment (a JSON Patch that never touches replicas) or
PodDisruptionBudget, or a clear refusal."""

from __future__ import annotations

from typing import Any

import pytest
from streamqueue_operator.deployment import render, render_disruption_budget
from streamqueue_operator.kubeapi import (
    HASH_ANNOTATION,
    BudgetConflict,
    DeploymentConflict,
    adoption_patch,
    budget_patch,
    template_hash,
)
from streamqueue_operator.models import StreamQueueSpec

OWNER = {"metadata": {"name": "chat", "namespace": "team", "uid": "u-1"}}


def existing(**meta: Any) -> dict[str, Any]:
    manifest = render(OWNER, StreamQueueSpec(), "img")
    return {
        "metadata": {"name": "chat-worker", "resourceVersion": "42", "labels": {"team": "x"}, **meta},
        "spec": {"replicas": 7, "selector": manifest["spec"]["selector"], "template": {}},
    }


def test_adopts_an_orphan_keeping_its_labels_and_replicas() -> None:
    manifest = render(OWNER, StreamQueueSpec(), "img")
    patch = adoption_patch(existing(), manifest, template_hash(manifest))
    assert patch[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "42"}
    assert all(not op["path"].startswith("/spec/replicas") for op in patch)
    ops = {op["path"]: op["value"] for op in patch}
    assert ops["/metadata/ownerReferences"] == manifest["metadata"]["ownerReferences"]
    assert (
        ops["/metadata/labels"]["team"] == "x" and ops["/metadata/labels"]["streamqueue.io/queue"] == "chat"
    )
    assert ops["/metadata/annotations"][HASH_ANNOTATION] == template_hash(manifest)
    assert ops["/spec/template"] == manifest["spec"]["template"]


def test_refuses_a_deployment_another_controller_owns() -> None:
    manifest = render(OWNER, StreamQueueSpec(), "img")
    other = [{"apiVersion": "apps/v1", "kind": "Foo", "name": "bar", "uid": "u-2", "controller": True}]
    with pytest.raises(DeploymentConflict, match="controlled by Foo/bar"):
        adoption_patch(existing(ownerReferences=other), manifest, "h")


def test_refuses_a_different_selector() -> None:
    manifest = render(OWNER, StreamQueueSpec(), "img")
    wrong = existing()
    wrong["spec"]["selector"] = {"matchLabels": {"app": "legacy"}}
    with pytest.raises(DeploymentConflict, match="selectors are immutable"):
        adoption_patch(wrong, manifest, "h")


def test_template_hash_changes_with_the_spec() -> None:
    a = render(OWNER, StreamQueueSpec(), "img")
    b = render(OWNER, StreamQueueSpec.model_validate({"worker": {"concurrency": 3}}), "img")
    assert template_hash(a) == template_hash(render(OWNER, StreamQueueSpec(), "img")) != template_hash(b)


def test_a_disruption_budget_is_replaced_whole_but_not_taken_from_another_controller() -> None:
    manifest = render_disruption_budget(
        OWNER, StreamQueueSpec.model_validate({"disruption": {"maxUnavailable": 2}})
    )
    theirs = {"metadata": {"name": "chat-worker", "resourceVersion": "7"}, "spec": {"minAvailable": 1}}
    ops = {op["path"]: op["value"] for op in budget_patch(theirs, manifest, "h")}
    assert ops["/spec"] == manifest["spec"]  # minAvailable gone: one of the two, never both
    assert ops["/metadata/ownerReferences"] == manifest["metadata"]["ownerReferences"]
    other = [{"apiVersion": "v1", "kind": "Foo", "name": "bar", "uid": "u-2", "controller": True}]
    with pytest.raises(BudgetConflict, match="PodDisruptionBudget chat-worker is controlled by Foo/bar"):
        budget_patch({**theirs, "metadata": {**theirs["metadata"], "ownerReferences": other}}, manifest, "h")
