"""The operator's defence against specs an older, looser CRD lets in (issue 23).

A CRD without the worker's patterns and rules admits ``worker.handler: nocolon``, which the
operator's own model refuses. The operator must neither roll it out nor stop scaling the queue
blind: the Deployment keeps its template and replicas, Ready says InvalidWorkerSpec naming the
field, one Warning Event, and fixing the spec recovers. A new queue with such a spec gets no
Deployment at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from streamqueue_harness.eventually import eventually
from streamqueue_harness.operatorproc import install_crd
from streamqueue_operator import crdgen

from tests.operator.queues import Queues, steady

pytestmark = pytest.mark.kube

BAD = {"handler": "nocolon"}


def _loosened(node: Any) -> Any:
    """The schema without ``pattern`` and CEL rules: what an older CRD admitted."""
    if isinstance(node, dict):
        return {k: _loosened(v) for k, v in node.items() if k not in ("pattern", "x-kubernetes-validations")}
    if isinstance(node, list):
        return [_loosened(v) for v in node]
    return node


@pytest.fixture
def loose_crd(control_plane: Any, streamqueue_crd: dict[str, Any]) -> Iterator[None]:
    """The looser CRD for one test; the generated one put back afterwards for the session's others."""
    crd = _loosened(crdgen.build_crd())
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump(crd))
    yield
    install_crd(control_plane)


def _ready(sq: Queues, name: str) -> tuple[int, str, str]:
    """(observedGeneration, reason, message) of Ready, once it speaks of the current generation."""
    condition = sq.condition(name, "Ready")
    generation = sq.get(name)["metadata"]["generation"]
    if condition.get("observedGeneration") != generation:
        return (0, "", "")
    return generation, condition["reason"], condition["message"]


def _template(sq: Queues, name: str) -> tuple[int, dict[str, Any]]:
    deployment = k8s.AppsV1Api(sq.api).read_namespaced_deployment(f"{name}-worker", sq.namespace)
    return deployment.spec.replicas, deployment.spec.template.to_dict()


def _invalid_spec_events(sq: Queues, name: str) -> int:
    events = k8s.CoreV1Api(sq.api).list_namespaced_event(
        sq.namespace, field_selector=f"involvedObject.kind=StreamQueue,involvedObject.name={name}"
    )
    return sum(e.count or 1 for e in events.items if (e.type, e.reason) == ("Warning", "InvalidWorkerSpec"))


def test_a_spec_the_operator_cannot_read_keeps_the_deployment_and_says_why(
    sq: Queues, loose_crd: None, start_operator: Any
) -> None:
    operator = start_operator()
    sq.stream(backlog=3)
    sq.apply("chat", minReplicas=1, maxReplicas=2)
    eventually(lambda: sq.replicas("chat") is not None, "the worker Deployment", timeout=60)
    before = eventually(lambda: _template(sq, "chat"), "the Deployment's template", timeout=10)

    sq.apply("chat", minReplicas=1, maxReplicas=2, worker=BAD)
    *_, message = eventually(
        lambda: (r := _ready(sq, "chat"))[1] == "InvalidWorkerSpec" and r, "Ready=InvalidWorkerSpec", 60
    )
    assert "spec.worker.handler: String should match pattern" in message, message
    eventually(lambda: _invalid_spec_events(sq, "chat") == 1, "one InvalidWorkerSpec Warning Event", 30)
    # Several polls (0.5 s each) later: no new Event, the same template and replicas.
    samples = steady(lambda: (_invalid_spec_events(sq, "chat"), _template(sq, "chat")), 3)
    assert all(sample == (1, before) for sample in samples), samples[-1]
    assert "poll failed" not in operator.logs()

    sq.apply("chat", minReplicas=1, maxReplicas=2)
    eventually(
        lambda: (r := _ready(sq, "chat"))[0] and r[1] != "InvalidWorkerSpec", "Ready after the fix", 60
    )
    assert _template(sq, "chat")[1] == before[1]


def test_a_new_queue_the_operator_cannot_read_gets_no_deployment(
    sq: Queues, loose_crd: None, start_operator: Any
) -> None:
    start_operator()
    sq.apply("fresh", worker=BAD)
    _, _, message = eventually(
        lambda: (r := _ready(sq, "fresh"))[1] == "InvalidWorkerSpec" and r, "Ready=InvalidWorkerSpec", 60
    )
    assert "spec.worker.handler" in message
    assert sq.replicas("fresh") is None
