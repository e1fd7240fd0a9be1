"""The rendered worker Deployment: settings names, secrets, security, and no replicas field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from streamqueue.settings import ENV_PREFIX, TUNING_FIELDS, WorkerSettings
from streamqueue_operator.deployment import render, render_disruption_budget, termination_grace
from streamqueue_operator.models import StreamQueueSpec, parse_spec

OWNER = {"metadata": {"name": "chat", "namespace": "team", "uid": "1234"}}


def _full_spec() -> StreamQueueSpec:
    return parse_spec(
        {
            "redis": {
                "url": "redis://redis:6379/2",
                "username": "sq",
                "passwordSecretRef": {"name": "redis-auth"},
                "tls": {"enabled": True, "caSecretRef": {"name": "redis-ca"}},
                "cluster": True,
            },
            "partitions": 8,
            "ordering": "perUser",
            "groupStartId": "$",
            "scaling": {"maxReplicas": 8},
            "worker": {
                "handler": "pkg.mod:fn",
                "handlerUrl": "http://ai/x",
                "handlerTimeoutSeconds": 5,
                "handlerRetries": 1,
                "batchSize": 10,
                "concurrency": 8,
                "blockMs": 1000,
                "claimIdleMs": 5000,
                "maxDeliveries": 3,
                "maxQueueAgeSeconds": 90.5,
                "deadLetterStream": "dead",
                "deadLetterMaxLen": 500,
                "errorReplies": False,
                "streamReplies": True,
                "chunkFlushMs": 50,
                "otelTracing": True,
                "replyMaxLen": 50,
                "replyTtlSeconds": 60,
                "maxMessageBytes": 1000,
                "shutdownGraceSeconds": 20,
                "logLevel": "DEBUG",
                "openaiBaseUrl": "http://model/v1",
                "openaiModel": "m",
                "openaiSystemPrompt": "Be brief.",
                "openaiMaxTokens": 100,
                "openaiTimeoutSeconds": 30,
                "openaiRetries": 2,
                "openaiMemoryTurns": 3,
                "openaiMemoryTtlSeconds": 600,
                "leaseTtlMs": 3000,
                "fairness": "perUser",
                "modelRequestsPerMinute": 600,
                "modelTokensPerMinute": 100000,
                "modelConcurrentCalls": 8,
                "env": [{"name": "EXTRA", "value": "1"}, {"name": "STREAMQUEUE_BATCH_SIZE", "value": "99"}],
                "nodeSelector": {"pool": "ai"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "serviceAccountName": "worker-sa",
                "resources": {"limits": {"cpu": "2"}},
            },
        }
    )


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    return container


def _env(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in _container(manifest)["env"]}


def test_every_env_var_the_operator_sets_is_a_worker_setting() -> None:
    """One source of names: a renamed WorkerSettings field fails here, not silently in a pod."""
    env = _env(render(OWNER, _full_spec(), "img"))
    fields = set(WorkerSettings.model_fields)
    ours = {name.removeprefix(ENV_PREFIX).lower() for name in env if name.startswith(ENV_PREFIX)}
    assert ours - fields == set()
    assert set(TUNING_FIELDS) <= ours  # every tuning knob of the full spec was rendered
    assert len(ours) >= len(TUNING_FIELDS) + 8


def test_password_only_by_secret_reference_and_consumer_is_the_pod_name() -> None:
    env = _env(render(OWNER, _full_spec(), "img"))
    assert env["STREAMQUEUE_REDIS_PASSWORD"] == {
        "name": "STREAMQUEUE_REDIS_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "password"}},
    }
    assert env["STREAMQUEUE_CONSUMER"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["STREAMQUEUE_REDIS_TLS"]["value"] == "true"
    assert env["STREAMQUEUE_REDIS_TLS_CA_FILE"]["value"] == "/etc/streamqueue/redis-ca/ca.crt"
    assert env["STREAMQUEUE_BATCH_SIZE"]["value"] == "99"  # the user's env wins over the operator's
    assert env["STREAMQUEUE_ERROR_REPLIES"]["value"] == "false"
    assert env["EXTRA"]["value"] == "1"
    assert (env["STREAMQUEUE_PARTITIONS"]["value"], env["STREAMQUEUE_ORDERING"]["value"]) == ("8", "perUser")
    assert env["STREAMQUEUE_REDIS_CLUSTER"]["value"] == "true"


def test_the_queue_shape_reaches_the_pod_whenever_the_spec_states_it() -> None:
    env = _env(render(OWNER, parse_spec({"partitions": 1, "ordering": "none"}), "img"))
    assert (env["STREAMQUEUE_PARTITIONS"]["value"], env["STREAMQUEUE_ORDERING"]["value"]) == ("1", "none")
    assert "STREAMQUEUE_REDIS_CLUSTER" not in env


def test_group_start_id_reaches_the_pod_so_an_adopted_stream_is_not_replayed() -> None:
    env = _env(render(OWNER, parse_spec({"groupStartId": "$"}), "img"))
    assert env["STREAMQUEUE_GROUP_START_ID"]["value"] == "$"
    assert WorkerSettings(group_start_id=env["STREAMQUEUE_GROUP_START_ID"]["value"]).group_start_id == "$"


def test_defaults_set_only_what_the_worker_cannot_know() -> None:
    env = _env(render(OWNER, StreamQueueSpec(), "streamqueue/worker:9"))
    assert set(env) == {
        "STREAMQUEUE_REDIS_URL",
        "STREAMQUEUE_STREAM",
        "STREAMQUEUE_GROUP",
        "STREAMQUEUE_REPLY_PREFIX",
        "STREAMQUEUE_CONSUMER",
        "STREAMQUEUE_HEALTH_PORT",
    }
    assert env["STREAMQUEUE_STREAM"]["value"] == "user_messages_queue"


def test_pod_is_locked_down_and_has_probes_on_the_health_port() -> None:
    manifest = render(OWNER, _full_spec(), "img")
    pod = manifest["spec"]["template"]["spec"]
    c = _container(manifest)
    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert c["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"}]
    assert pod["nodeSelector"] == {"pool": "ai"} and pod["tolerations"][0]["key"] == "gpu"
    assert pod["serviceAccountName"] == "worker-sa" and pod["automountServiceAccountToken"] is True
    assert c["resources"] == {"limits": {"cpu": "2"}}
    assert pod["terminationGracePeriodSeconds"] == 35 > 20


def test_no_replicas_and_owned_by_the_streamqueue() -> None:
    manifest = render(OWNER, StreamQueueSpec(), "img")
    assert "replicas" not in manifest["spec"]
    assert manifest["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "streamqueue.io/v1beta1",
            "kind": "StreamQueue",
            "name": "chat",
            "uid": "1234",
            "controller": True,
        }
    ]
    assert manifest["spec"]["selector"]["matchLabels"]["streamqueue.io/queue"] == "chat"
    assert manifest["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_a_rollout_never_takes_capacity_away() -> None:
    strategy = render(OWNER, StreamQueueSpec(), "img")["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}}


def test_the_disruption_budget_covers_exactly_the_workers_and_belongs_to_the_queue() -> None:
    deployment = render(OWNER, StreamQueueSpec(), "img")
    budget = render_disruption_budget(OWNER, StreamQueueSpec())
    assert budget["metadata"] == deployment["metadata"]
    assert budget["spec"] == {
        "selector": deployment["spec"]["selector"],
        "maxUnavailable": 1,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }
    percent = parse_spec({"disruption": {"maxUnavailable": "50%"}})
    assert render_disruption_budget(OWNER, percent)["spec"]["maxUnavailable"] == "50%"


@pytest.mark.parametrize("value", [0, -1, "0%", "101%", "1", "12.5%", "all"])
def test_a_budget_that_would_block_every_drain_or_is_no_amount_is_refused(value: object) -> None:
    with pytest.raises(ValidationError, match=r"disruption\.maxUnavailable"):
        parse_spec({"disruption": {"maxUnavailable": value}})


def test_termination_grace_outlasts_the_worker_default() -> None:
    default_grace = WorkerSettings.model_fields["shutdown_grace_seconds"].default
    assert termination_grace(StreamQueueSpec().worker) > default_grace
    fractional = parse_spec({"worker": {"shutdownGraceSeconds": 2.5}}).worker
    assert termination_grace(fractional) == 18  # rounded up, then the margin


def test_existing_spec_names_keep_their_env_names() -> None:
    """replyMaxLen predates the derived names; it still sets STREAMQUEUE_REPLY_MAXLEN."""
    env = _env(render(OWNER, parse_spec({"worker": {"replyMaxLen": 7, "shutdownGraceSeconds": 20}}), "i"))
    assert env["STREAMQUEUE_REPLY_MAXLEN"]["value"] == "7"
    assert float(env["STREAMQUEUE_SHUTDOWN_GRACE_SECONDS"]["value"]) == 20
