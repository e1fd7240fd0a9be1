"""kopf wiring: reconcile each StreamQueue's Deployment, and run one scaler daemon per queue.

Run with ``streamqueue-operator`` (or ``kopf run -m streamqueue_operator.handlers``). Everything
that decides lives elsewhere; these handlers only connect kopf's events to ``deployment``,
``act`` and ``scaler``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kopf

from .act import Cluster, DeploymentConflict, load_api_client
from .decide import Decision
from .deployment import DEFAULT_WORKER_IMAGE, render
from .models import GROUP, PLURAL, QUEUE_LABEL, VERSION, parse_spec
from .scaler import QueueScaler, Replicas, Settings

MISSING_DEPLOYMENT_GRACE_SECONDS = 10.0
API_THREADS = 32
POLL_ERROR_BACKOFF_SECONDS = 5.0
log = logging.getLogger("streamqueue.operator")


@dataclass(frozen=True)
class OperatorConfig:
    worker_image: str = DEFAULT_WORKER_IMAGE
    status_min_interval: float = 10.0

    @classmethod
    def from_env(cls) -> OperatorConfig:
        """Defaults for ``kopf run`` without the CLI; the CLI passes its own config in the memo."""
        return cls(
            worker_image=os.environ.get("STREAMQUEUE_OPERATOR_WORKER_IMAGE") or DEFAULT_WORKER_IMAGE,
            status_min_interval=float(os.environ.get("STREAMQUEUE_OPERATOR_STATUS_MIN_INTERVAL", "10")),
        )


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING  # our own Events are posted explicitly with kopf.event
    settings.scanning.disabled = True  # no cluster-wide CRD/namespace watch: least privilege
    settings.peering.standalone = True
    # kopf's defaults wait without limit to connect and up to 5 minutes per request; through a
    # network partition that would freeze finalizer and event writes long after the API is back.
    settings.networking.connect_timeout = 10
    settings.networking.request_timeout = 30
    settings.watching.connect_timeout = 10
    if "config" not in memo:
        memo.config = OperatorConfig.from_env()
    # Every API call runs in a thread; asyncio's default pool (cores + 4) would queue hundreds of
    # queues' status writes behind each other and delay their polls.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(API_THREADS, "k8s-api"))
    memo.cluster = Cluster(load_api_client(API_THREADS))
    memo.scalers = {}


def _scaler(memo: kopf.Memo, namespace: str, name: str) -> QueueScaler:
    key = (namespace, name)
    if key not in memo.scalers:
        settings = Settings(status_min_interval=memo.config.status_min_interval)
        memo.scalers[key] = QueueScaler(memo.cluster, settings, namespace, name)
    return memo.scalers[key]


@kopf.index("apps", "v1", "deployments", labels={QUEUE_LABEL: kopf.PRESENT})  # type: ignore[arg-type]
def worker_replicas(
    namespace: str, name: str, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> dict[tuple[str, str], Replicas]:
    """Replica counts of the worker Deployments, kept current by the watch (no GET per poll)."""
    return {(namespace, name): Replicas(spec.get("replicas", 1), status.get("readyReplicas") or 0)}


async def _ensure_deployment(body: kopf.Body, memo: kopf.Memo) -> None:
    meta = body["metadata"]
    spec = parse_spec(dict(body.get("spec") or {}))
    owner = {"metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]}}
    manifest = render(owner, spec, memo.config.worker_image)
    previous = (body.get("status") or {}).get("currentReplicas")
    initial = spec.scaling.min_replicas if previous is None else previous
    initial = min(max(initial, spec.scaling.min_replicas), spec.scaling.max_replicas)
    scaler = _scaler(memo, meta["namespace"], meta["name"])
    try:
        applied = await memo.cluster.apply_deployment(manifest, initial)
    except DeploymentConflict as exc:
        scaler.deployment_error = str(exc)
        kopf.event(body, type="Warning", reason="DeploymentConflict", message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=30) from exc
    scaler.deployment_error = None
    if applied.created:
        message = f"created Deployment {manifest['metadata']['name']} with {initial} replica(s)"
        kopf.event(body, type="Normal", reason="DeploymentCreated", message=message)
    elif applied.changed:
        message = f"updated Deployment {manifest['metadata']['name']} (pod template)"
        kopf.event(body, type="Normal", reason="DeploymentUpdated", message=message)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Create, adopt or update the worker Deployment (everything but its replica count)."""
    await _ensure_deployment(body, memo)


def _replicas(index: kopf.Index, namespace: str, deployment: str) -> Replicas | None:
    store = index.get((namespace, deployment))
    return next(iter(store), None) if store else None


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0)  # type: ignore[arg-type]
async def scale_queue(
    body: kopf.Body,
    namespace: str,
    name: str,
    status: kopf.Status,
    memo: kopf.Memo,
    worker_replicas: kopf.Index,
    logger: logging.Logger,
    **_: Any,
) -> None:
    """The queue's poll loop; cancelled by kopf when the StreamQueue is deleted or the operator stops."""
    scaler = _scaler(memo, namespace, name)
    scaler.seed(dict(status))

    def on_scale(before: int, after: int, decision: Decision) -> None:
        reason = "ScaledUp" if after > before else "ScaledDown"
        message = f"{before} -> {after} replicas ({decision.reason}): {decision.message}"
        kopf.event(body, type="Normal", reason=reason, message=message[:1000])

    def on_event(kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason, message=message[:1000])

    missing_since: float | None = None
    try:
        while True:
            replicas = _replicas(worker_replicas, namespace, scaler.deployment)
            missing_since = None if replicas else (missing_since or time.monotonic())
            try:
                if missing_since and time.monotonic() - missing_since > MISSING_DEPLOYMENT_GRACE_SECONDS:
                    logger.warning("Deployment %s is missing: recreating it", scaler.deployment)
                    missing_since = time.monotonic()
                    await _ensure_deployment(body, memo)
                interval = await scaler.poll(body, replicas, on_scale, on_event)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Keep scaling the queue through transient API errors; the traceback says what failed.
                logger.exception("poll failed; retrying in %.0fs", POLL_ERROR_BACKOFF_SECONDS)
                interval = POLL_ERROR_BACKOFF_SECONDS
            await asyncio.sleep(interval)
    finally:
        await scaler.close()
        memo.scalers.pop((namespace, name), None)
