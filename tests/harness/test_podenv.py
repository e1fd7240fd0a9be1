"""Container environment resolution, as the kubelet does it (pure: lookups are dictionaries)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from streamqueue_harness.podenv import EnvResolutionError, Sources, container_env, expand

POD: dict[str, Any] = {
    "metadata": {"name": "q-worker-abc", "namespace": "team", "uid": "u-1", "labels": {"queue": "q"}},
    "spec": {"nodeName": "node-a", "serviceAccountName": "default"},
    "status": {},
}
SECRETS = {
    "redis": {"password": base64.b64encode(b"s3cret").decode(), "user": base64.b64encode(b"ann").decode()}
}
CONFIG_MAPS = {"tuning": {"BATCH": "10", "BLOCK": "2000"}}
SOURCES = Sources(secret=SECRETS.get, config_map=CONFIG_MAPS.get)


def _env(*entries: dict[str, Any], env_from: list[dict[str, Any]] | None = None) -> dict[str, str]:
    return container_env(POD, {"name": "worker", "env": list(entries), "envFrom": env_from or []}, SOURCES)


def test_literal_field_secret_and_configmap_values() -> None:
    env = _env(
        {"name": "URL", "value": "redis://r:6379"},
        {"name": "CONSUMER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "QUEUE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['queue']"}}},
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "redis", "key": "password"}}},
        {"name": "BATCH", "valueFrom": {"configMapKeyRef": {"name": "tuning", "key": "BATCH"}}},
    )
    assert env == {
        "URL": "redis://r:6379", "CONSUMER": "q-worker-abc", "NS": "team", "QUEUE": "q", "IP": "127.0.0.1",
        "PASSWORD": "s3cret", "BATCH": "10",
    }  # fmt: skip


def test_env_from_comes_first_with_prefix_and_env_entries_override_it() -> None:
    env = _env(
        {"name": "SQ_BATCH", "value": "99"},
        env_from=[{"configMapRef": {"name": "tuning"}, "prefix": "SQ_"}, {"secretRef": {"name": "redis"}}],
    )
    assert env == {"SQ_BATCH": "99", "SQ_BLOCK": "2000", "password": "s3cret", "user": "ann"}


def test_references_expand_from_earlier_variables_only() -> None:
    env = _env(
        {"name": "HOST", "value": "r"},
        {"name": "URL", "value": "redis://$(HOST):$(PORT)/$$(HOST)"},
        {"name": "PORT", "value": "6379"},
    )
    assert env["URL"] == "redis://r:$(PORT)/$(HOST)"


def test_optional_references_may_be_missing() -> None:
    env = _env(
        {"name": "A", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}}},
        {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "tuning", "key": "nope", "optional": True}}},
        env_from=[{"secretRef": {"name": "absent", "optional": True}}],
    )
    assert env == {}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"secretKeyRef": {"name": "absent", "key": "k"}}, "Secret 'absent' not found"),
        ({"secretKeyRef": {"name": "redis", "key": "k"}}, "key 'k' in Secret 'redis' not found"),
        ({"configMapKeyRef": {"name": "tuning", "key": "k"}}, "key 'k' in ConfigMap 'tuning' not found"),
        ({"fieldRef": {"fieldPath": "spec.hostname"}}, "fieldRef 'spec.hostname' is not supported"),
        ({"resourceFieldRef": {"resource": "limits.cpu"}}, "not supported"),
    ],
)
def test_missing_or_unsupported_sources_fail_like_create_container_config_error(
    entry: dict[str, Any], message: str
) -> None:
    with pytest.raises(EnvResolutionError, match=message):
        _env({"name": "X", "valueFrom": entry})


_names = st.from_regex(r"[A-Z][A-Z0-9_]{0,8}", fullmatch=True)
_text = st.text(alphabet=st.sampled_from("ab$()XYZ_ "), max_size=20)


@given(env=st.dictionaries(_names, _text, max_size=4), text=st.text(alphabet=st.sampled_from("ab()XYZ_ ")))
def test_expansion_leaves_text_without_references_unchanged(env: dict[str, str], text: str) -> None:
    assert expand(text, env) == text


@given(env=st.dictionaries(_names, _text, max_size=4), name=_names)
def test_escaped_reference_is_never_expanded(env: dict[str, str], name: str) -> None:
    assert expand(f"$$({name})", env) == f"$({name})"
    assert expand(f"$({name})", env) == env.get(name, f"$({name})")
