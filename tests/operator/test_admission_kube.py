"""Every StreamQueue the real API server accepts renders a worker that starts (issue 23).

Specs are generated from the CRD's own schema; each goes to the API server as a server-side dry-run
create, and for each it accepts, the worker environment the operator renders is parsed in-process
as the pod would parse it (``WorkerSettings``). A worker rule without its admission twin in the CRD
fails here.
"""

from __future__ import annotations

import re
import string
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from streamqueue_operator import crdgen
from streamqueue_operator.deployment import worker_refusal
from streamqueue_operator.models import GROUP, PLURAL, VERSION, parse_spec

pytestmark = pytest.mark.kube

# The specs that crash-looped before the worker's rules reached the CRD (issue 23).
CRASH_LOOPS = {
    "reply-prefix": ({"stream": "ai_to_user:q"}, "spec.stream"),
    "handler": ({"worker": {"handler": "nocolon"}}, "spec.worker.handler"),
    "dead-letter": ({"worker": {"deadLetterStream": "user_messages_queue"}}, "spec.worker.deadLetterStream"),
    "handler-url": ({"worker": {"handlerUrl": "not a url"}}, "spec.worker.handlerUrl"),
    "openai-url": ({"worker": {"openaiBaseUrl": "ftp://x/v1"}}, "spec.worker.openaiBaseUrl"),
    "fair-slot": ({"stream": "q{", "worker": {"fairness": "perUser"}}, "spec.stream"),
    "dead-letter-partition": (
        {"partitions": 4, "worker": {"deadLetterStream": "user_messages_queue:{3}"}},
        "spec.worker.deadLetterStream",
    ),
}
# Specs next to those that the worker accepts, so admission must too (a CEL twin no stricter).
NEAR_MISSES = {
    "dead-letter-beyond-partitions": {
        "partitions": 4,
        "worker": {"deadLetterStream": "user_messages_queue:{4}"},
    },
    "dead-letter-leading-zero": {"partitions": 4, "worker": {"deadLetterStream": "user_messages_queue:{03}"}},
    "dead-letter-one-partition": {"worker": {"deadLetterStream": "user_messages_queue:{0}"}},
}
# Strings the worker's rules turn on (queue names, prefixes, handlers, URLs), next to random ones.
NOTABLE = (
    *("user_messages_queue", "ai_to_user:", "ai_to_user:q", "q", "q{", "{q}", "q}", "{", "q:dead"),
    *("user_messages_queue:{1}", "q:{0}", "q:{2}", "q:{01}"),
    *("nocolon", "mod:fn", "http://x/v1", "not a url", "ftp://x/v1", "redis://r:6379/0"),
)
ALPHABET = string.ascii_letters + string.digits + ":/{}._-?# "


def _string(node: dict[str, Any]) -> st.SearchStrategy[str]:
    low, high = node.get("minLength", 0), min(node.get("maxLength", 24), 24)
    options = [st.sampled_from(NOTABLE), st.text(ALPHABET, min_size=low, max_size=high)]
    if "pattern" in node:
        options.append(st.from_regex(node["pattern"], alphabet=ALPHABET))
    return st.one_of(options).filter(lambda s: low <= len(s) <= node.get("maxLength", len(s)))


def _number(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    low, high = node.get("minimum"), node.get("maximum")
    if node["type"] == "integer":
        return st.integers(low, high)
    exclusive = node.get("exclusiveMinimum", False)
    return st.floats(low, high, exclude_min=exclusive, allow_nan=False, allow_infinity=False)


def from_schema(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of one OpenAPI node of the CRD: every property optional, lists and maps kept short."""
    kind = node.get("type")
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if kind == "object" and "properties" in node:
        optional = {name: from_schema(sub) for name, sub in node["properties"].items()}
        return st.fixed_dictionaries({}, optional=optional)
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        values = from_schema(node["additionalProperties"])
        return st.dictionaries(st.sampled_from(["a", "b.c/d"]), values, max_size=2)
    if kind == "object":  # a free-form Kubernetes object, kept intact: checked on the Deployment
        return st.just({})
    if kind == "array":
        return st.lists(from_schema(node["items"]), max_size=min(node.get("maxItems", 2), 2))
    if kind in ("integer", "number"):
        return _number(node)
    if kind == "boolean":
        return st.booleans()
    return _string(node)


SPEC_SCHEMA = crdgen.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _manifest(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    metadata = {"name": name, "namespace": namespace}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "StreamQueue", "metadata": metadata, "spec": spec}


def test_the_crash_loops_of_issue_23_are_refused_naming_the_field(
    control_plane: Any, kube_namespace: str, streamqueue_crd: dict[str, Any]
) -> None:
    for name, (spec, field) in CRASH_LOOPS.items():
        manifest = yaml.safe_dump(_manifest(name, kube_namespace, spec))
        result = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest, check=False)
        assert result.returncode != 0, name
        assert re.search(rf"{re.escape(field)}\b", result.stderr), (name, result.stderr)


def test_specs_next_to_the_crash_loops_are_accepted(
    control_plane: Any, kube_namespace: str, streamqueue_crd: dict[str, Any]
) -> None:
    for name, spec in NEAR_MISSES.items():
        assert worker_refusal(parse_spec(spec)) is None, name
        manifest = yaml.safe_dump(_manifest(name, kube_namespace, spec))
        result = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest, check=False)
        assert result.returncode == 0, (name, result.stderr)


@pytest.mark.parametrize("seed", [spec for spec, _ in CRASH_LOOPS.values()], ids=list(CRASH_LOOPS))
def test_the_operator_would_not_roll_out_the_crash_loops(seed: dict[str, Any]) -> None:
    """Defence in depth: what an older CRD lets through, the operator recognises (handlers keep
    the Deployment). The pattern rules live in the spec model too, so parsing refuses those."""
    try:
        spec = parse_spec(seed)
    except ValueError:
        return
    assert worker_refusal(spec) is not None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=from_schema(SPEC_SCHEMA))
@example(spec=CRASH_LOOPS["reply-prefix"][0])
@example(spec=CRASH_LOOPS["handler"][0])
@example(spec=CRASH_LOOPS["dead-letter"][0])
@example(spec=CRASH_LOOPS["handler-url"][0])
@example(spec=CRASH_LOOPS["openai-url"][0])
@example(spec=CRASH_LOOPS["fair-slot"][0])
@example(spec=CRASH_LOOPS["dead-letter-partition"][0])
@example(spec={"stream": "q", "partitions": 4, "worker": {"deadLetterStream": "q:{4}"}})
def test_every_spec_the_api_server_accepts_starts_a_worker(
    api: k8s.ApiClient, kube_namespace: str, streamqueue_crd: dict[str, Any], spec: dict[str, Any]
) -> None:
    custom = k8s.CustomObjectsApi(api)
    try:
        accepted = custom.create_namespaced_custom_object(
            GROUP, VERSION, kube_namespace, PLURAL, _manifest("q", kube_namespace, spec), dry_run="All"
        )
    except ApiException as exc:
        assert exc.status == 422, exc.body  # refused at admission: nothing to start
        return
    refusal = worker_refusal(parse_spec(accepted["spec"]))
    assert refusal is None, f"the API server accepted {spec}, the worker refuses it: {refusal}"
