"""Render a StreamQueue's worker Deployment (pure: spec in, manifest out).

The manifest never contains ``spec.replicas``: the scaler owns that field (it is set once on
create and then only by ``act``), so re-applying the template after a spec change can never undo a
scaling decision. Worker settings reach the pod as ``STREAMQUEUE_*`` variables, the names the
worker's ``WorkerSettings`` reads; the password only ever as a ``secretKeyRef``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from streamqueue.connection import RedisSettings
from streamqueue.settings import (
    DEFAULT_HEALTH_PORT,
    DEFAULT_SHUTDOWN_GRACE_SECONDS,
    TUNING_FIELDS,
    env_name,
    from_environ,
)

from . import __version__
from .models import GROUP, KIND, QUEUE_LABEL, VERSION, RedisSpec, StreamQueueSpec, WorkerSpec
from .redis_access import spec_connection

DEFAULT_WORKER_IMAGE = f"streamqueue/worker:{__version__}"
GRACE_MARGIN_SECONDS = 15
CA_DIR = "/etc/streamqueue/redis-ca"
CONTAINER = "worker"
MANAGED_BY = "streamqueue-operator"
# Surge a quarter (at least one pod) and never take a Ready pod away before its replacement is Ready.
ROLLING_UPDATE = {"maxSurge": "25%", "maxUnavailable": 0}
DEFAULT_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}


def deployment_name(queue: str) -> str:
    return f"{queue}-worker"


def selector_labels(queue: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "streamqueue-worker", QUEUE_LABEL: queue}


def _env(field: str, value: Any) -> dict[str, Any]:
    """The variable that sets WorkerSettings.<field>; booleans as "true"/"false"."""
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return {"name": env_name(field), "value": text}


def worker_env(spec: StreamQueueSpec) -> list[dict[str, Any]]:
    """The worker's environment: connection, queue names, tuning, then the user's extra env.

    A user variable with the same name replaces the operator's, except the consumer name, which
    must stay the pod name for dead-consumer cleanup to be correct.
    """
    consumer = env_name("consumer")
    redis = _redis_env(spec.redis)
    env = [
        redis[0],  # the URL
        _env("stream", spec.stream),
        _env("group", spec.group),
        _env("reply_prefix", spec.reply_prefix),
        {"name": consumer, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        _env("health_port", DEFAULT_HEALTH_PORT),
        *redis[1:],
    ]
    # The queue's shape, when it is not the worker's default (both come from WorkerSettings).
    env += [
        _env(name, getattr(spec, name))
        for name in ("partitions", "ordering", "group_start_id")
        if name in spec.model_fields_set
    ]
    if spec.worker.openai_api_key_secret_ref:
        ref = spec.worker.openai_api_key_secret_ref
        secret = {"secretKeyRef": {"name": ref.name, "key": ref.key}}
        env.append({"name": env_name("openai_api_key"), "valueFrom": secret})
    tuning = {field: getattr(spec.worker, field) for field in TUNING_FIELDS}
    env += [_env(field, value) for field, value in tuning.items() if value is not None]
    extra = [e.model_dump(by_alias=True, exclude_none=True) for e in spec.worker.env or []]
    overridden = {e["name"] for e in extra} - {consumer}
    return [e for e in env if e["name"] not in overridden] + [e for e in extra if e["name"] != consumer]


def worker_refusal(spec: StreamQueueSpec) -> str | None:
    """Why the worker would refuse to start in the rendered pod (its own validation's words), or None.

    The API server refuses such specs already (the CRD carries the worker's rules); this catches
    what slips through: an older CRD, or a ``worker.env`` variable overriding a rendered one.
    Variables taken from ``valueFrom`` (Secrets, the pod name, the user's sources) have values the
    spec does not hold; they are left out, so the worker's defaults stand in for them.
    """
    env = {e["name"]: e["value"] for e in worker_env(spec) if "value" in e}
    try:
        from_environ(env)
    except ValidationError as exc:
        return "; ".join(_error_text(error) for error in exc.errors())
    return None


def spec_refusal(exc: ValidationError) -> str:
    """Why a spec the operator's own model refuses is not rolled out, naming each field (``spec.worker.
    handler: ...``). The API server refuses such specs already; an older, looser CRD lets them in."""
    errors = "; ".join(_spec_error_text(error) for error in exc.errors())
    return f"not rolled out: the operator cannot read the spec: {errors}"


def _spec_error_text(error: Any) -> str:
    """``spec.<field>: <message>``; the model reports fields by their camelCase (CRD) names."""
    field = ".".join(("spec", *(str(part) for part in error["loc"])))
    return f"{field}: {str(error['msg']).removeprefix('Value error, ')}"


def _error_text(error: Any) -> str:
    """``<ENV_VARIABLE>: <message>``, or the bare message for a rule across settings."""
    field = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{env_name(field)}: {message}" if field else message


def _redis_env(redis: RedisSpec) -> list[dict[str, Any]]:
    """The worker's ``STREAMQUEUE_REDIS_*`` variables for ``spec_connection(redis)``, URL first.

    Every ``RedisSettings`` field whose value differs from its default, in declaration order; the
    password only as a ``secretKeyRef`` and the CA bundle as the file its Secret is mounted as.
    """
    ca = redis.tls.ca_secret_ref
    connection = spec_connection(redis, tls_ca_file=Path(CA_DIR, ca.key) if ca else None)
    env = []
    for field, info in RedisSettings.model_fields.items():  # redis_<name> is RedisConnection's <name>
        if field == "redis_password" and redis.password_secret_ref:
            ref = redis.password_secret_ref
            secret = {"secretKeyRef": {"name": ref.name, "key": ref.key}}
            env.append({"name": env_name(field), "valueFrom": secret})
            continue
        value = getattr(connection, field.removeprefix("redis_"))
        if field == "redis_url" or value != info.default:
            env.append(_env(field, value))
    return env


def termination_grace(worker: WorkerSpec) -> int:
    """Longer than the worker's own shutdown grace, so SIGKILL never cuts a clean drain short."""
    if worker.termination_grace_period_seconds is not None:
        return worker.termination_grace_period_seconds
    shutdown = worker.shutdown_grace_seconds
    return math.ceil(DEFAULT_SHUTDOWN_GRACE_SECONDS if shutdown is None else shutdown) + GRACE_MARGIN_SECONDS


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "health"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _container(spec: StreamQueueSpec, default_image: str) -> dict[str, Any]:
    worker = spec.worker
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": worker.image or default_image,
        "env": worker_env(spec),
        "ports": [{"name": "health", "containerPort": DEFAULT_HEALTH_PORT, "protocol": "TCP"}],
        "livenessProbe": _probe("/healthz", 10, 6),
        "readinessProbe": _probe("/readyz", 5, 2),
        "resources": worker.resources if worker.resources is not None else DEFAULT_RESOURCES,
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if worker.image_pull_policy:
        container["imagePullPolicy"] = worker.image_pull_policy
    if spec.redis.tls.ca_secret_ref:
        container["volumeMounts"].append({"name": "redis-ca", "mountPath": CA_DIR, "readOnly": True})
    return container


def _pod_spec(spec: StreamQueueSpec, default_image: str) -> dict[str, Any]:
    worker = spec.worker
    pod: dict[str, Any] = {
        "containers": [_container(spec, default_image)],
        "terminationGracePeriodSeconds": termination_grace(worker),
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}],
        # Workers talk to Redis only; without a dedicated account they get no API token at all.
        "automountServiceAccountToken": worker.service_account_name is not None,
    }
    if spec.redis.tls.ca_secret_ref:
        ref = spec.redis.tls.ca_secret_ref
        pod["volumes"].append(
            {
                "name": "redis-ca",
                "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": ref.key}]},
            }
        )
    optional = {
        "serviceAccountName": worker.service_account_name,
        "nodeSelector": worker.node_selector,
        "tolerations": worker.tolerations,
        "affinity": worker.affinity,
        "imagePullSecrets": [r.model_dump() for r in worker.image_pull_secrets or []] or None,
    }
    pod.update({k: v for k, v in optional.items() if v is not None})
    return pod


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    meta = owner["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
    }


def _labels(queue: str) -> dict[str, str]:
    return {
        **selector_labels(queue),
        "app.kubernetes.io/instance": queue,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def _over_workers(owner: dict[str, Any], api_version: str, kind: str, **spec: Any) -> dict[str, Any]:
    """An object over the queue's worker pods, named after the queue's Deployment and selecting the pods
    by their labels; owned by the queue, so the garbage collector deletes it with the StreamQueue."""
    meta = owner["metadata"]
    queue = meta["name"]
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": deployment_name(queue),
            "namespace": meta["namespace"],
            "labels": _labels(queue),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {"selector": {"matchLabels": selector_labels(queue)}, **spec},
    }


def render(owner: dict[str, Any], spec: StreamQueueSpec, default_image: str) -> dict[str, Any]:
    """The worker Deployment for a StreamQueue object (``owner``), without ``spec.replicas``.

    Rollouts (any change of ``spec.worker``) surge: a new pod starts before an old one is told to
    drain, and no old pod stops before its replacement is Ready (maxUnavailable 0), so the queue's
    capacity never drops below the scaler's count while the pods change.
    """
    queue = owner["metadata"]["name"]
    labels = _labels(queue)
    pod_labels = {**(spec.worker.pod_labels or {}), **labels}
    template_meta: dict[str, Any] = {"labels": pod_labels}
    if spec.worker.pod_annotations:
        template_meta["annotations"] = dict(spec.worker.pod_annotations)
    return _over_workers(
        owner,
        "apps/v1",
        "Deployment",
        revisionHistoryLimit=3,
        strategy={"type": "RollingUpdate", "rollingUpdate": ROLLING_UPDATE},
        template={"metadata": template_meta, "spec": _pod_spec(spec, default_image)},
    )


def render_disruption_budget(owner: dict[str, Any], spec: StreamQueueSpec) -> dict[str, Any]:
    """The PodDisruptionBudget of a StreamQueue's workers: a node drain evicts them a few at a time.

    ``maxUnavailable``, not ``minAvailable``: it scales with the Deployment and never blocks a drain
    (at one replica one eviction is allowed; at zero there is nothing to protect), where
    ``minAvailable: 1`` would refuse to evict a single worker forever. Workers that are not Ready
    serve nothing, so ``AlwaysAllow`` lets a drain evict them whatever the budget says (a
    crash-looping queue must not hold up a node). An evicted worker drains on SIGTERM like any other.
    """
    return _over_workers(
        owner,
        "policy/v1",
        "PodDisruptionBudget",
        maxUnavailable=spec.disruption.max_unavailable,
        unhealthyPodEvictionPolicy="AlwaysAllow",
    )
