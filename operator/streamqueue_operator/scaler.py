"""One queue's poll loop: observe → decide → act, once per ``pollIntervalSeconds``.

Data flows one way: the spec and the Deployment's replica counts come in, ``observe`` reads Redis,
``decide`` (pure) picks the count, and the cluster writes happen last (scale, event, status,
housekeeping). The only state kept between polls is the decision's history and what was last
written, which is what lets status writes happen only on meaningful change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from pydantic import ValidationError
from streamqueue import wire

from . import deletion_cost, housekeeping, metrics, redis_access, redis_hub, status
from .decide import PAUSES, Decision, Reason, ScalerState, decide, parse_pause
from .deployment import deployment_name, selector_labels, spec_refusal
from .kubeapi import API_ERRORS, Cluster, NotLeader
from .models import RedisSpec, ScalingSpec, StreamQueueSpec, parse_spec
from .observe import Observation, consumer_loads, observe_with
from .settings import OperatorSettings

RECONNECT_INTERVAL_SECONDS = 5.0
PATCH_TRUST_SECONDS = 5.0


@dataclass(frozen=True)
class Rest:
    """A queue at rest (``QueueScaler._settled``): until ``until``, until ``kube`` (what the cluster
    said then) changes, or until ``watch`` wakes (its Redis's ``RestSweep`` found the first message
    with ``rest_check.not_idle``), each poll is only a comparison, with no Redis command of its own."""

    until: float
    kube: tuple[Any, ...]
    watch: redis_hub.RestWatch


@dataclass(frozen=True)
class Replicas:
    """The worker Deployment as last seen by the watch: spec.replicas and status.readyReplicas."""

    desired: int
    ready: int


ScaleCallback = Callable[[int, int, Decision], None]
# (type, reason, message) of an Event on the StreamQueue
EventCallback = Callable[[str, str, str], None]

HOLD_EVENT_REPEAT_SECONDS = 300.0
# A hold's Event reason, and whether it is a Warning.
HOLD_EVENTS = {
    Reason.STABILIZED: ("ScaleDownDelayed", False),
    Reason.COLD_START: ("ColdStartHold", False),
    Reason.LIMIT_BOUND: ("LimitBound", False),
    Reason.PAUSED: ("Paused", False),
    Reason.PAUSE_INVALID: ("InvalidPauseAnnotation", True),
}


class QueueScaler:
    """Per-StreamQueue state across polls; ``poll`` runs one observe → decide → act step."""

    def __init__(
        self,
        cluster: Cluster,
        settings: OperatorSettings,
        namespace: str,
        name: str,
        hub: redis_hub.RedisHub | None = None,
    ) -> None:
        self.cluster, self.settings = cluster, settings
        # the operator's, shared by all queues; a test's own
        self.hub = hub or redis_hub.RedisHub(settings.rest_check_seconds)
        self.namespace, self.name = namespace, name
        self.deployment = deployment_name(name)
        self.deployment_error: str | None = None
        self.log = logging.getLogger(f"streamqueue.scaler.{namespace}.{name}")
        self._spec: tuple[int, StreamQueueSpec] | None = None
        self._client: tuple[RedisSpec, redis_hub.Shared] | None = None
        self._rest: Rest | None = None
        self._offered: dict[str, Any] | None = None
        self._client_error: str | None = None
        self._last_connect = -RECONNECT_INTERVAL_SECONDS
        self._state: ScalerState | None = None
        self._patched: tuple[int, int, float] | None = None
        self._written: dict[str, Any] | None = None
        self._last_write = 0.0
        self._last_housekeeping = time.monotonic()
        self._last_scale: tuple[str | None, str | None] = (None, None)
        self._status_write: asyncio.Task[None] | None = None
        self._housekeeping_run: asyncio.Task[None] | None = None
        self._hold: Reason | None = None
        self._hold_announced: dict[Reason, float] = {}

    def spec(self, body: Mapping[str, Any]) -> StreamQueueSpec:
        generation = body["metadata"].get("generation", 0)
        if self._spec is None or self._spec[0] != generation:
            self._spec = (generation, parse_spec(body.get("spec") or {}))
        return self._spec[1]

    async def close(self) -> None:
        for task in (self._status_write, self._housekeeping_run):
            if task is not None:
                task.cancel()
        await self._drop_client()
        metrics.forget(self.namespace, self.name)

    async def _redis(self, spec: RedisSpec) -> redis_hub.Shared | None:
        """The queue's share of the client for ``spec`` (None while it cannot connect)."""
        if self._client is not None and self._client[0] == spec:
            return self._client[1]
        now = time.monotonic()
        if now - self._last_connect < RECONNECT_INTERVAL_SECONDS:
            return None
        self._last_connect = now
        await self._drop_client()
        try:
            credentials = await redis_access.resolve(self.cluster, self.namespace, spec)
        except LookupError as exc:
            self._client_error = str(exc)
            return None
        self._client_error = None
        shared = self.hub.acquire(redis_access.dialled(spec, credentials, self.namespace))
        self._client = (spec, shared)
        return shared

    async def _observe(self, spec: StreamQueueSpec) -> Observation:
        shared = await self._redis(spec.redis)
        at = time.monotonic()
        if shared is None:
            return Observation(at=at, error=self._client_error or "waiting to reconnect")
        streams = wire.partition_streams(spec.stream, spec.partitions)
        run = shared.pipeline.execute
        obs = await observe_with(run, streams, spec.group, at, limit_key=wire.limit_bound_key(spec.stream))
        if obs.error and "auth" in obs.error.lower():
            await self._drop_client()  # re-read the Secret on the next attempt: the password may have rotated
        return obs

    async def _drop_client(self) -> None:
        self._end_rest()  # its watch is the old client's
        if self._client is not None:
            shared, self._client = self._client[1], None
            await self.hub.release(shared)

    async def _current(self, replicas: Replicas, now: float) -> int:
        """The Deployment's replicas; our own patch wins until the watch has caught up with it.

        A watch can stay behind for a minute (after a network partition kopf reconnects only once
        the stream has been silent for its inactivity timeout); trusting it then would re-send
        the same patch, and its Event, every poll. So once the trust period ends with the watch
        still showing the old count, the API server is asked.
        """
        if self._patched is None:
            return replicas.desired
        value, before, at = self._patched
        if replicas.desired != before:
            self._patched = None
            return replicas.desired
        if now - at < PATCH_TRUST_SECONDS:
            return value
        try:
            actual = await self.cluster.deployment_replicas(self.namespace, self.deployment)
        except API_ERRORS as exc:
            self._api_error("read", exc)
            return value
        if actual == value:
            self._patched = (value, before, now)
            return value
        self._patched = None
        return replicas.desired if actual is None else actual

    def _api_error(self, operation: metrics.ApiOperation, exc: Exception) -> None:
        metrics.API_ERRORS.labels(self.namespace, self.name, operation).inc()
        self.log.warning("Kubernetes API %s failed, holding and retrying: %s", operation, exc)

    def seed(self, previous_status: dict[str, Any]) -> None:
        """Take over what the last operator instance wrote, so a restart changes nothing by itself."""
        self._written = dict(previous_status) if previous_status else None
        self._last_scale = (previous_status.get("lastScaleTime"), previous_status.get("lastScaleReason"))

    async def poll(
        self,
        body: Mapping[str, Any],
        replicas: Replicas | None,
        on_scale: ScaleCallback,
        on_event: EventCallback | None = None,
    ) -> float:
        """One step; returns the poll interval to sleep before the next."""
        try:
            spec = self.spec(body)
        except ValidationError as exc:
            return self._hold_unreadable(body, exc)
        if self._rest is not None:
            if self._still_at_rest(body, replicas):
                return spec.scaling.poll_interval_seconds
            self._end_rest()
        obs = await self._observe(spec)
        metrics.record_observation(self.namespace, self.name, obs)
        now = obs.at
        if replicas is None:  # not created yet, or not ours to scale (deployment_error says why)
            if self.deployment_error:
                held = Decision(0, Reason.DEPLOYMENT_ERROR, self.deployment_error)
                await self._write_status(body, spec, obs, held, current=0, ready=0)
            return spec.scaling.poll_interval_seconds
        current = await self._current(replicas, now)
        if self._state is None:
            self._state = ScalerState.seeded(now, current)
        pause = parse_pause(body["metadata"].get("annotations"))
        decision, self._state = decide(spec.scaling, self._state, obs, current, replicas.ready, pause)
        self._announce_hold(decision, current, now, on_event)
        if 0 < decision.desired < current and obs.ok:
            await self._rank_pods_for_removal(spec)
        if decision.desired != current:
            current = await self._scale(current, replicas.desired, decision, now, on_scale)
        metrics.record_replicas(
            self.namespace, self.name, decision, current, replicas.ready, spec.scaling.max_replicas
        )
        await self._write_status(body, spec, obs, decision, current, replicas.ready)
        if obs.ok:
            self._start_housekeeping(spec, now)
        if self._settled(spec, obs, decision, current, replicas) and self._client is not None:
            streams = tuple(wire.partition_streams(spec.stream, spec.partitions))
            watch = self._client[1].sweep.watch(streams, spec.group)
            self._rest = Rest(self._rest_until(spec, now), self._kube_view(body, replicas), watch)
        return spec.scaling.poll_interval_seconds

    async def pause(self, interval: float) -> None:
        """Sleep until the next tick of ``interval``, shared with every queue polling at it (their
        commands share a pipeline); a queue at rest wakes as soon as its sweep finds a message."""
        delay = redis_hub.until_next_tick(interval, asyncio.get_running_loop().time())
        if self._rest is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._rest.watch.woken.wait()

    def _end_rest(self) -> None:
        if self._rest is not None and self._client is not None:
            self._client[1].sweep.unwatch(self._rest.watch)
        self._rest = None

    def _settled(
        self, spec: StreamQueueSpec, obs: Observation, decision: Decision, current: int, replicas: Replicas
    ) -> bool:
        """Whether full polls would change nothing until the queue or its objects do: no backlog (the
        lag known, not estimated), the count at minReplicas (or paused) with every pod ready, and
        nothing owed to the API server (no unconfirmed scale, the last status written)."""
        return (
            obs.ok
            and obs.backlog == 0
            and not obs.lag_estimated
            and decision.desired == current == replicas.desired == replicas.ready
            and (current == spec.scaling.min_replicas or decision.reason in PAUSES)
            and self._patched is None
            and self._offered == self._written
        )

    def _rest_until(self, spec: StreamQueueSpec, now: float) -> float:
        """The next full poll of a queue at rest at the latest: housekeeping runs in full polls only."""
        housekeeping_due = self._last_housekeeping + spec.housekeeping.interval_seconds
        return min(now + self.settings.rest_max_seconds, housekeeping_due)

    def _kube_view(self, body: Mapping[str, Any], replicas: Replicas | None) -> tuple[Any, ...]:
        """What a rest depends on besides Redis: the spec's generation, the pause annotations among the
        others, the Deployment's counts and whether it could be ensured."""
        meta = body["metadata"]
        return meta.get("generation", 0), dict(meta.get("annotations") or {}), replicas, self.deployment_error

    def _still_at_rest(self, body: Mapping[str, Any], replicas: Replicas | None) -> bool:
        """What stands in for a full poll at rest: the same objects, not yet due, and not woken by
        the sweep (every partition's group with lag 0 and nothing pending at its last check).
        Anything else ends the rest, and this same poll then runs in full."""
        rest = self._rest
        if rest is None or self._client is None or time.monotonic() >= rest.until:
            return False
        return not rest.watch.woken.is_set() and rest.kube == self._kube_view(body, replicas)

    def _hold_unreadable(self, body: Mapping[str, Any], exc: ValidationError) -> float:
        """A spec the operator cannot read (an older, looser CRD let it in): no observing and no
        scaling, so the Deployment keeps its template and replicas until the spec is fixed; Ready says
        which field is wrong (the handlers post the Event, once per generation)."""
        generation = body["metadata"].get("generation", 0)
        self._offer_status(status.refused(self._written or {}, generation, spec_refusal(exc)))
        return ScalingSpec().poll_interval_seconds

    def _announce_hold(
        self, decision: Decision, current: int, now: float, on_event: EventCallback | None
    ) -> None:
        """An Event when a hold starts (a pause, a cold start, a scale-down waiting for its window) and
        when a pause ends: on change only, and the same hold at most every few minutes, so a flapping
        decision cannot flood the Events."""
        hold = decision.reason if decision.reason in HOLD_EVENTS and decision.desired == current else None
        if decision.reason in PAUSES:
            hold = decision.reason  # paused-replicas: its scale is a ScaledUp/Down Event, the pause its own
        previous, self._hold = self._hold, hold
        if hold == previous or on_event is None:
            return
        if previous in PAUSES and hold not in PAUSES:
            on_event(
                "Normal",
                "Resumed",
                f"pause annotations removed: scaling follows the queue again ({current} replica(s))",
            )
        if hold is None:
            return
        last = self._hold_announced.get(hold)
        if hold not in PAUSES and last is not None and now - last < HOLD_EVENT_REPEAT_SECONDS:
            return
        self._hold_announced[hold] = now
        reason, warning = HOLD_EVENTS[hold]
        on_event("Warning" if warning else "Normal", reason, decision.message)

    def _selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in selector_labels(self.name).items())

    async def _rank_pods_for_removal(self, spec: StreamQueueSpec) -> None:
        """Just before a scale-down, let the ReplicaSet controller remove idle pods first: each pod's
        ``pod-deletion-cost`` from its consumer's pending count and idle time over every partition.
        Only pods whose cost changed are patched; a failure here costs the ordering, never the
        scale-down."""
        if self._client is None:
            return
        streams = wire.partition_streams(spec.stream, spec.partitions)
        try:
            shared = self._client[1]
            async with shared.direct:
                loads = await consumer_loads(shared.client, streams, spec.group)
            pods = await self.cluster.pod_annotation(
                self.namespace, self._selector(), deletion_cost.ANNOTATION
            )
            changed = deletion_cost.changes(pods, loads)
            await asyncio.gather(
                *(
                    self.cluster.annotate_pod(self.namespace, pod, deletion_cost.ANNOTATION, value)
                    for pod, value in changed.items()
                )
            )
        except (redis.RedisError, OSError) as exc:
            self.log.warning("pod deletion costs not set: %s", exc)
            return
        except API_ERRORS as exc:
            self._api_error("deletion_cost", exc)
            return
        metrics.DELETION_COST_WRITES.labels(self.namespace, self.name).inc(len(changed))
        if changed:
            self.log.info("pod-deletion-cost before scale-down: %s", changed)

    async def _scale(
        self, current: int, watched: int, decision: Decision, now: float, on_scale: ScaleCallback
    ) -> int:
        """Patch the replica count; on an API error keep the current count and retry next poll."""
        try:
            await self.cluster.scale(self.namespace, self.deployment, decision.desired)
        except API_ERRORS as exc:
            self._api_error("scale", exc)
            return current
        self._patched = (decision.desired, watched, now)
        self._last_scale = (status.now_iso(), f"{decision.reason}: {decision.message}")
        metrics.record_scale(self.namespace, self.name, current, decision.desired, decision.reason)
        on_scale(current, decision.desired, decision)
        self.log.info(
            "scaled %s -> %s (%s: %s)", current, decision.desired, decision.reason, decision.message
        )
        return decision.desired

    async def _write_status(
        self,
        body: Mapping[str, Any],
        spec: StreamQueueSpec,
        obs: Observation,
        decision: Decision,
        current: int,
        ready: int,
    ) -> None:
        snapshot = status.Snapshot(
            generation=body["metadata"].get("generation", 0),
            deployment=self.deployment,
            deployment_error=self.deployment_error,
            observation=obs,
            decision=decision,
            current=current,
            ready=ready,
            last_scale_time=self._last_scale[0],
            last_scale_reason=self._last_scale[1],
            limit_setting=status.limit_setting(spec.worker, obs.limit_bound),
        )
        self._offer_status(status.build(snapshot, self._written or {}))

    def _offer_status(self, new: dict[str, Any]) -> None:
        """Write ``new`` if it is worth writing (``status.worth_writing``) and no write is in flight."""
        self._offered = new
        previous = self._written or {}
        now = time.monotonic()
        if self._written is not None and not status.worth_writing(
            previous, new, now - self._last_write, self.settings.status_min_interval
        ):
            return
        if self._status_write is not None and not self._status_write.done():
            return  # one write in flight per queue; the next poll sends whatever is newest then
        self._status_write = asyncio.create_task(self._send_status(new, now))

    async def _send_status(self, new: dict[str, Any], now: float) -> None:
        """Patch status off the poll path, so a slow API server never delays the next observation."""
        try:
            await self.cluster.patch_status(self.namespace, self.name, new)
        except API_ERRORS as exc:
            self._api_error("status", exc)
            return
        except NotLeader:
            return  # leadership ended while the write waited; the next leader writes its own
        except Exception:
            self.log.exception("status write failed; retrying on the next poll")
            return
        metrics.STATUS_WRITES.labels(self.namespace, self.name).inc()
        self._written, self._last_write = new, now

    def _start_housekeeping(self, spec: StreamQueueSpec, now: float) -> None:
        """Housekeeping when due, off the poll path (as status writes are): its pod listing waits in the
        shared API pool, which at 2,000 queues the other queues' listings fill, and a poll waiting for
        it noticed the queue's first message seconds late (issue 20). One run at a time per queue."""
        if now - self._last_housekeeping < spec.housekeeping.interval_seconds or self._client is None:
            return
        if self._housekeeping_run is not None and not self._housekeeping_run.done():
            return
        self._last_housekeeping = now
        self._housekeeping_run = asyncio.create_task(self._housekeeping(spec, self._client[1]))

    async def _housekeeping(self, spec: StreamQueueSpec, shared: redis_hub.Shared) -> None:
        rules, client = spec.housekeeping, shared.client
        streams = wire.partition_streams(spec.stream, spec.partitions)  # each its own group, slot
        try:
            if rules.dead_consumer_cleanup:
                pods = await self.cluster.pod_names(self.namespace, self._selector())
                for stream in streams:
                    self.cluster.fence()  # Redis writes too: only the leader cleans up
                    async with shared.direct:
                        result = await housekeeping.remove_dead_consumers(client, stream, spec.group, pods)
                    metrics.CONSUMERS_DELETED.labels(self.namespace, self.name).inc(len(result.deleted))
                    if result.deleted:
                        self.log.info("deleted dead consumers %s of %s", ", ".join(result.deleted), stream)
            if rules.trim_stream:
                for stream in streams:
                    self.cluster.fence()
                    async with shared.direct:
                        trimmed = await housekeeping.trim_processed(client, stream)
                    metrics.ENTRIES_TRIMMED.labels(self.namespace, self.name).inc(trimmed)
        except (redis.RedisError, OSError) as exc:
            self.log.warning("housekeeping skipped: %s", exc)
        except API_ERRORS as exc:
            self._api_error("housekeeping", exc)
        except NotLeader:
            return  # leadership ended meanwhile; the next leader cleans up
        except Exception:
            self.log.exception("housekeeping failed; retried when next due")
