"""kopf wiring: one daemon per StreamQueue that, on the leader, ensures its Deployment and scales it.

Run with ``streamqueue-operator`` (or ``kopf run -m streamqueue_operator.handlers``). Everything
that decides lives elsewhere; these handlers only connect kopf's watches to ``deployment``,
``act``, ``scaler`` and ``leader``.

Every replica runs the same watches, index and daemons, so a standby has everything in memory
when it takes over; only the Lease holder's daemons act (docs/ha.md). There are deliberately no
on.create/update/resume handlers: kopf would record their progress in annotations on every
replica. The leader's loop converges instead (level-triggered): it ensures the Deployment when it
takes over, when the spec's generation changes and when the Deployment goes missing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import kopf
from pydantic import ValidationError

from . import settings as operator_settings
from .decide import Decision
from .deployment import render, render_disruption_budget, spec_refusal, worker_refusal
from .kubeapi import API_ERRORS, BudgetConflict, Cluster, DeploymentConflict, NotLeader, load_api_client
from .leader import Lease, Timing
from .models import GROUP, PLURAL, QUEUE_LABEL, VERSION, parse_spec
from .redis_hub import RedisHub
from .scaler import QueueScaler, Replicas
from .settings import OperatorSettings
from .stagger import RolloutDeferred, RolloutStagger
from .status import INVALID_WORKER_SPEC, WorkerRefusal

MISSING_DEPLOYMENT_GRACE_SECONDS = 10.0
API_THREADS = 32
POLL_ERROR_BACKOFF_SECONDS = 5.0
log = logging.getLogger("streamqueue.operator")


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
    if "config" not in memo:  # ``kopf run`` without the CLI: the environment, then the defaults
        memo.config = OperatorSettings(**operator_settings.from_env(os.environ))
    # Every API call runs in a thread; asyncio's default pool (cores + 4) would queue hundreds of
    # queues' status writes behind each other and delay their polls.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(API_THREADS, "k8s-api"))
    identity = memo.config.identity()
    memo.cluster = Cluster(load_api_client(API_THREADS), manager=f"streamqueue-operator_{identity}")
    memo.scalers = {}
    memo.redis_hub = RedisHub(memo.config.rest_check_seconds)  # one client per Redis, for its queues
    memo.rollouts = RolloutStagger(memo.config.rollout_stagger_seconds)
    memo.lease = None
    if memo.config.leader_election:
        config: OperatorSettings = memo.config
        timing = Timing(config.lease_duration, config.renew_deadline, config.retry_period)
        memo.lease = Lease(memo.cluster, config.lease_namespace, config.lease_name, identity, timing)
        memo.cluster.leading = memo.lease.leading
        memo.lease.start()


@kopf.on.cleanup()
async def release_lease(memo: kopf.Memo, **_: Any) -> None:
    """After kopf has stopped the daemons: hand the Lease over now rather than after it expires."""
    if memo.get("lease") is not None:
        await memo.lease.stop()


def _scaler(memo: kopf.Memo, namespace: str, name: str) -> QueueScaler:
    key = (namespace, name)
    if key not in memo.scalers:
        memo.scalers[key] = QueueScaler(memo.cluster, memo.config, namespace, name, memo.redis_hub)
    return memo.scalers[key]


@kopf.index("apps", "v1", "deployments", labels={QUEUE_LABEL: kopf.PRESENT})  # type: ignore[arg-type]
def worker_replicas(
    namespace: str, name: str, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> dict[tuple[str, str], Replicas]:
    """Replica counts of the worker Deployments, kept current by the watch (no GET per poll)."""
    return {(namespace, name): Replicas(spec.get("replicas", 1), status.get("readyReplicas") or 0)}


async def _ensure_deployment(body: kopf.Body, memo: kopf.Memo, staggered: bool) -> None:
    """Create or update the queue's Deployment; ``staggered``: a change waits for its turn in
    ``memo.rollouts`` (the change is the operator's own, not a spec edit)."""
    meta = body["metadata"]
    scaler = _scaler(memo, meta["namespace"], meta["name"])
    try:
        spec = parse_spec(dict(body.get("spec") or {}))
    except ValidationError as exc:  # let in by an older CRD; the scaler holds the Deployment meanwhile
        _refuse(body, scaler, spec_refusal(exc))
    refusal = worker_refusal(spec)
    if refusal is not None:
        _refuse(body, scaler, f"not rolled out: the worker would refuse to start: {refusal}")
    owner = {"metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]}}
    manifest = render(owner, spec, memo.config.worker_image)
    previous = (body.get("status") or {}).get("currentReplicas")
    initial = spec.scaling.min_replicas if previous is None else previous
    initial = min(max(initial, spec.scaling.min_replicas), spec.scaling.max_replicas)
    key = (meta["namespace"], meta["name"])
    turn = (lambda: memo.rollouts.take(key, time.monotonic())) if staggered else None
    try:
        applied = await memo.cluster.apply_deployment(manifest, initial, before_rollout=turn)
    except RolloutDeferred as exc:
        kopf.event(body, type="Normal", reason="RolloutDeferred", message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=exc.delay) from exc
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
    await _ensure_disruption_budget(body, memo, render_disruption_budget(owner, spec))


def _refuse(body: kopf.Body, scaler: QueueScaler, message: str) -> NoReturn:
    """Keep the Deployment as it is (its pods would crash-loop): Ready says why, and one Warning Event
    per generation (the caller retries only when the spec changes)."""
    scaler.deployment_error = WorkerRefusal(message)
    kopf.event(body, type="Warning", reason=INVALID_WORKER_SPEC, message=message[:1000])
    raise kopf.PermanentError(message)


async def _ensure_disruption_budget(body: kopf.Body, memo: kopf.Memo, manifest: dict[str, Any]) -> None:
    """The workers' PodDisruptionBudget, after their Deployment: scaling never waits for it, and
    a failure (an older chart's RBAC without it, another owner) says so and is retried."""
    name = manifest["metadata"]["name"]
    try:
        applied = await memo.cluster.apply_disruption_budget(manifest)
    except (BudgetConflict, *API_ERRORS) as exc:
        message = f"PodDisruptionBudget {name} not ensured (node drains are not limited): {exc}"
        kopf.event(body, type="Warning", reason="DisruptionBudgetFailed", message=message[:1000])
        raise kopf.TemporaryError(message, delay=30) from exc
    if applied.changed:
        budget = f"maxUnavailable {manifest['spec']['maxUnavailable']}"
        message = f"{'created' if applied.created else 'updated'} PodDisruptionBudget {name} ({budget})"
        kopf.event(body, type="Normal", reason="DisruptionBudgetApplied", message=message)


def _replicas(index: kopf.Index, namespace: str, deployment: str) -> Replicas | None:
    store = index.get((namespace, deployment))
    return next(iter(store), None) if store else None


async def _converge(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, staggered: bool) -> float:
    """Ensure the Deployment; 0 when done, else seconds until it is worth trying again."""
    try:
        await _ensure_deployment(body, memo, staggered)
    except kopf.TemporaryError as exc:
        return exc.delay or POLL_ERROR_BACKOFF_SECONDS
    except kopf.PermanentError as exc:  # its own Event says why; retried when the spec changes
        logger.info("Deployment not ensured until the spec changes: %s", exc)
        return math.inf
    except API_ERRORS as exc:  # e.g. a 409: the Deployment changed (its status) since it was read
        logger.warning("Deployment not ensured; retrying in %.0fs: %s", POLL_ERROR_BACKOFF_SECONDS, exc)
        return POLL_ERROR_BACKOFF_SECONDS
    return 0.0


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0)  # type: ignore[arg-type]
async def scale_queue(
    body: kopf.Body,
    namespace: str,
    name: str,
    memo: kopf.Memo,
    worker_replicas: kopf.Index,
    logger: logging.Logger,
    **_: Any,
) -> None:
    """The queue's loop on every replica; cancelled by kopf when the StreamQueue is deleted or the
    operator stops. A standby waits here for the Lease; the leader polls until it loses it."""
    try:
        while True:
            if memo.lease is not None:
                await memo.lease.wait_until_leading()
            scaler = _scaler(memo, namespace, name)  # new on each takeover: from what the last leader wrote
            scaler.seed(dict(body.get("status") or {}))
            await _lead(body, scaler, memo, worker_replicas, logger)
            await _drop_scaler(memo, namespace, name)
            log.info("%s/%s: not the leader: waiting for the Lease", namespace, name)
    finally:
        await _drop_scaler(memo, namespace, name)


async def _drop_scaler(memo: kopf.Memo, namespace: str, name: str) -> None:
    scaler = memo.scalers.pop((namespace, name), None)
    if scaler is not None:
        await scaler.close()


async def _lead(
    body: kopf.Body, scaler: QueueScaler, memo: kopf.Memo, worker_replicas: kopf.Index, logger: logging.Logger
) -> None:
    """Poll and act with ``scaler`` while this replica leads; returns once it does not (a refused write)."""

    def on_scale(before: int, after: int, decision: Decision) -> None:
        reason = "ScaledUp" if after > before else "ScaledDown"
        message = f"{before} -> {after} replicas ({decision.reason}): {decision.message}"
        on_event("Normal", reason, message)

    def on_event(kind: str, reason: str, message: str) -> None:
        if memo.cluster.leading():  # kopf posts Events itself, so the fence is checked here
            kopf.event(body, type=kind, reason=reason, message=message[:1000])

    ensured: int | None = None  # the generation last ensured (or tried)
    # Until the spec changes under this leader, a template change is the operator's own (an upgrade:
    # new default image or rendering) and waits for its turn; a spec edit rolls out at once.
    staggered = True
    retry_at: float | None = None  # when a failed ensure is due again
    missing_since: float | None = None
    while memo.cluster.leading():
        generation, now = body["metadata"].get("generation", 0), time.monotonic()
        replicas = _replicas(worker_replicas, scaler.namespace, scaler.deployment)
        missing_since = None if replicas else (missing_since or now)
        missing = missing_since is not None and now - missing_since > MISSING_DEPLOYMENT_GRACE_SECONDS
        try:
            if ensured != generation or ((retry_at or missing) and now >= (retry_at or 0.0)):
                if missing and ensured == generation:
                    logger.warning("Deployment %s is missing: recreating it", scaler.deployment)
                staggered = staggered and ensured in (None, generation)
                ensured, missing_since = generation, None
                delay = await _converge(body, memo, logger, staggered)
                retry_at = now + delay if delay else None
            interval = await scaler.poll(body, replicas, on_scale, on_event)
        except NotLeader:
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            # Keep scaling the queue through transient API errors; the traceback says what failed.
            logger.exception("poll failed; retrying in %.0fs", POLL_ERROR_BACKOFF_SECONDS)
            interval = POLL_ERROR_BACKOFF_SECONDS
        await scaler.pause(interval)  # until the tick shared with the others, or woken at rest
