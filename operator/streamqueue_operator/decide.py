"""Decide a queue's replica count: a pure function of the scaling policy and observation history.

No I/O, no clock: the caller passes ``now`` and the previous ``ScalerState`` and gets back the
decision and the next state, so every rule below is unit- and property-tested.

Rules, in order:
- Redis unreachable or group missing: hold the current count (or ``fallbackReplicas`` if higher);
  never scale down, never to zero, on missing information. A missing group with entries in the
  stream wakes one worker from zero so it can create the group.
- At zero: stay asleep while backlog <= ``activationBacklog``, wake on the first backlog above it.
- Otherwise the larger of two targets, each a constraint on a replica's load:
  backlog target ``ceil(backlog / targetBacklogPerReplica)`` (KEDA-compatible) and drain target
  ``ceil((arrival_rate + backlog / targetDrainSeconds) / service_rate_per_replica)``, with rates
  measured over successive observations while the workers were saturated (lag > 0 throughout).
- Scale up at once; scale down only to the highest recommendation of the stabilization window.
- With minReplicas 0 keep one replica until the queue has been idle for ``idleCooldownSeconds``
  (and the window has nothing above one), then go to zero.
- Cold start: pods scheduled but not Ready are capacity already being added. While some are
  (``ready < current``) and the last scale-up is younger than ``coldStartSeconds``, a further
  scale-up is held: the backlog that builds up while they start is what they were added for.
- Limit-bound: while the workers' model-API calls wait for a shared limit (``obs.limit_bound``), more
  workers would not help: a scale-up is held at the current count. Scale-downs, scale to zero and
  the wake from zero (to one worker: being bound takes a worker) follow the rules above.
- Pause (annotations, KEDA's semantics): ``paused`` holds the current count, ``paused-replicas``
  sets that count and holds it, an invalid value holds and says why. The history keeps advancing,
  so resuming decides from fresh rates and the usual stabilization window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from .models import GROUP, ScalingSpec
from .observe import Observation

PAUSED = f"{GROUP}/paused"
PAUSED_REPLICAS = f"{GROUP}/paused-replicas"
MAX_PAUSED_REPLICAS = 1000  # maxReplicas' own upper bound

RATE_WINDOW_SECONDS = 15.0
MIN_RATE_SPAN_SECONDS = 2.0


class Reason(StrEnum):
    """Why a decision picked its count. The values are a contract: the ``Scaling`` condition's reason,
    the ``reason`` label of ``streamqueue_scale_events_total``, the ScaledUp/Down Events and
    ``lastScaleReason`` carry them, and docs/operator.md lists them (tested)."""

    BACKLOG = "Backlog"
    DRAIN_RATE = "DrainRate"
    ACTIVATION = "Activation"
    STABILIZED = "Stabilized"
    IDLE = "Idle"
    REDIS_UNAVAILABLE = "RedisUnavailable"
    GROUP_MISSING = "GroupMissing"
    COLD_START = "ColdStart"
    LIMIT_BOUND = "LimitBound"
    PAUSED = "Paused"
    PAUSE_INVALID = "PauseInvalid"
    DEPLOYMENT_ERROR = "DeploymentError"  # no decision: the worker Deployment cannot be scaled


# The pause annotations set the count (validly or not).
PAUSES = frozenset({Reason.PAUSED, Reason.PAUSE_INVALID})
# The count is held against what the queue alone asks for: the decision's message says why.
HOLDS = frozenset({Reason.STABILIZED, Reason.COLD_START, Reason.LIMIT_BOUND, *PAUSES})


@dataclass(frozen=True)
class Sample:
    """The counters of one successful observation that rates are computed from."""

    at: float
    entries_added: int
    entries_read: int | None
    pending: int
    lag: int
    ready: int


@dataclass(frozen=True)
class Pause:
    """What the pause annotations ask: hold (``replicas`` None), hold at ``replicas``, or ``invalid``."""

    replicas: int | None = None
    invalid: str | None = None


@dataclass(frozen=True)
class ScalerState:
    """Observation history the decision needs; carried from one poll to the next."""

    samples: tuple[Sample, ...] = ()
    recommendations: tuple[tuple[float, int], ...] = ()
    last_active_at: float | None = None
    scaled_up_at: float | None = None

    @classmethod
    def seeded(cls, now: float, current: int) -> ScalerState:
        """State after an operator (re)start: the current count counts as a fresh recommendation and the
        queue as just active, so a restart can neither scale down nor scale to zero early."""
        return cls(recommendations=((now, current),), last_active_at=now)


@dataclass(frozen=True)
class Rates:
    arrival: float
    service_per_replica: float | None


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: Reason
    message: str
    backlog_target: int | None = None
    drain_target: int | None = None
    rates: Rates | None = None


def _clamp(n: int, policy: ScalingSpec) -> int:
    return min(max(n, policy.min_replicas), policy.max_replicas)


def _decide_without_data(policy: ScalingSpec, obs: Observation, current: int) -> Decision:
    floor = current
    if policy.fallback_replicas is not None:
        floor = max(floor, policy.fallback_replicas)
    if obs.error is not None:
        reason, what = Reason.REDIS_UNAVAILABLE, f"Redis unreachable ({obs.error})"
    else:
        reason, what = Reason.GROUP_MISSING, "consumer group does not exist yet"
        if current == 0 and obs.stream_length > policy.activation_backlog:
            floor = max(floor, 1)
    desired = _clamp(floor, policy)
    verb = "holding" if desired == current else "using"
    return Decision(desired, reason, f"{what}: {verb} {desired} replica(s)")


def measure_rates(samples: tuple[Sample, ...]) -> Rates | None:
    """Arrival rate, and per-replica service rate when the workers were saturated over the window."""
    if len(samples) < 2:
        return None
    first, last = samples[0], samples[-1]
    span = last.at - first.at
    if span < MIN_RATE_SPAN_SECONDS:
        return None
    arrival = max(0, last.entries_added - first.entries_added) / span
    saturated = all(s.lag > 0 for s in samples)
    ready = min(s.ready for s in samples)
    if not saturated or ready <= 0 or first.entries_read is None or last.entries_read is None:
        return Rates(arrival, None)
    completed = (last.entries_read - first.entries_read) - (last.pending - first.pending)
    if completed <= 0:
        return Rates(arrival, None)
    return Rates(arrival, completed / span / ready)


def _targets(policy: ScalingSpec, backlog: int, rates: Rates | None) -> tuple[int, int | None]:
    backlog_target = math.ceil(backlog / policy.target_backlog_per_replica)
    if rates is None or not rates.service_per_replica:
        return backlog_target, None
    needed = rates.arrival + backlog / policy.target_drain_seconds
    return backlog_target, math.ceil(needed / rates.service_per_replica)


def _describe(obs: Observation, backlog_target: int, drain_target: int | None, rates: Rates | None) -> str:
    lag = f"lag {obs.lag}{' (estimated)' if obs.lag_estimated else ''}"
    text = f"backlog {obs.backlog} ({lag}, pending {obs.pending}) -> backlog target {backlog_target}"
    if drain_target is not None and rates is not None and rates.service_per_replica:
        text += (
            f", drain target {drain_target} (arrival {rates.arrival:.1f}/s, "
            f"{rates.service_per_replica:.1f}/s per replica)"
        )
    return text


def decide(
    policy: ScalingSpec,
    state: ScalerState,
    obs: Observation,
    current: int,
    ready: int,
    pause: Pause | None = None,
) -> tuple[Decision, ScalerState]:
    """The replica count for this poll (at ``obs.at``) and the state for the next poll.

    ``current`` is the Deployment's replica count, ``ready`` its ready replicas (service rates are
    per ready replica; ``current - ready`` pods are starting), ``pause`` what the annotations ask.
    """
    now = obs.at
    window_start = now - policy.scale_down_stabilization_seconds
    if not obs.ok:
        # A held count is a recommendation too: after an outage, scale-down waits a full window.
        # Rates spanning an outage (or a Redis restart that lost the stream) mean nothing: drop them.
        decision = _decide_without_data(policy, obs, current)
        held = (*(r for r in state.recommendations if r[0] > window_start), (now, decision.desired))
        next_state = ScalerState(
            recommendations=held, last_active_at=state.last_active_at, scaled_up_at=state.scaled_up_at
        )
        return _paused(decision, pause, current), _scaled_up(next_state, decision, current, pause, now)

    samples = (*(s for s in state.samples if s.at > now - RATE_WINDOW_SECONDS), _sample(obs, ready))
    rates = measure_rates(samples)
    previous = state.samples[-1] if state.samples else None
    arrived = previous is not None and obs.entries_added > previous.entries_added
    backlog = obs.backlog
    last_active = now if backlog > 0 or arrived or state.last_active_at is None else state.last_active_at
    backlog_target, drain_target = _targets(policy, backlog, rates)
    detail = _describe(obs, backlog_target, drain_target, rates)
    raw = max(backlog_target, drain_target or 0)
    reason = (
        Reason.DRAIN_RATE if drain_target is not None and drain_target > backlog_target else Reason.BACKLOG
    )

    idle_for = now - last_active
    to_zero = False
    if current == 0 and backlog <= policy.activation_backlog:
        raw, reason = 0, Reason.IDLE
    elif current == 0:
        raw, reason = max(raw, 1), Reason.ACTIVATION
    elif backlog == 0 and policy.min_replicas == 0 and idle_for >= policy.idle_cooldown_seconds:
        raw, reason, to_zero = 0, Reason.IDLE, True
        detail += f"; idle for {idle_for:.0f}s >= idleCooldownSeconds {policy.idle_cooldown_seconds}"
    else:
        raw = max(raw, 1)

    recommendation = _clamp(raw, policy)
    recommendations = (*(r for r in state.recommendations if r[0] > window_start), (now, recommendation))
    next_state = ScalerState(
        samples=samples,
        recommendations=recommendations,
        last_active_at=last_active,
        scaled_up_at=state.scaled_up_at,
    )

    if recommendation >= current:
        desired = recommendation
    else:
        stabilized = max(r for _, r in recommendations)
        desired = min(current, stabilized)
        if to_zero and stabilized <= 1:
            desired = 0
        elif desired > recommendation:
            reason = Reason.STABILIZED
            detail += (
                f"; scale-down held at {desired} by the {policy.scale_down_stabilization_seconds}s "
                "stabilization window"
            )
    if _clamp(desired, policy) != desired or (desired == recommendation != raw and reason != Reason.IDLE):
        desired = _clamp(desired, policy)
        detail += f"; clamped to [{policy.min_replicas}, {policy.max_replicas}]"
    decision = Decision(desired, reason, detail, backlog_target, drain_target, rates)
    decision = _limit_hold(policy, obs, decision, current)
    decision = _cold_start_hold(policy, state, decision, current, ready, now)
    return _paused(decision, pause, current), _scaled_up(next_state, decision, current, pause, now)


def _limit_hold(policy: ScalingSpec, obs: Observation, decision: Decision, current: int) -> Decision:
    """Hold a scale-up while the queue is limit-bound; from zero wake one worker (the limit needs one).

    Checked before the cold-start hold, so when both apply the reason names the one that outlasts it.
    """
    if obs.limit_bound is None or decision.desired <= current:
        return decision
    held = max(current, policy.min_replicas, 1 if current == 0 else 0)
    if held >= decision.desired:
        return decision
    message = (
        f"{decision.message}; limit-bound ({obs.limit_bound}): the workers' model-API calls wait for "
        f"that limit, so more workers would not help: holding {held} instead of {decision.desired} "
        "while it lasts"
    )
    return replace(decision, desired=held, reason=Reason.LIMIT_BOUND, message=message)


def _cold_start_hold(
    policy: ScalingSpec, state: ScalerState, decision: Decision, current: int, ready: int, now: float
) -> Decision:
    """Hold a further scale-up while the pods of the last one are still starting (bounded in time)."""
    starting = current - ready
    if decision.desired <= current or starting <= 0 or state.scaled_up_at is None:
        return decision
    since = now - state.scaled_up_at
    if since >= policy.cold_start_seconds:
        return decision
    held = max(current, policy.min_replicas)
    message = (
        f"{decision.message}; {starting} of {current} pod(s) not Ready yet (scaled up {since:.0f}s ago): "
        f"holding {held} instead of {decision.desired} until they are Ready "
        f"or coldStartSeconds {policy.cold_start_seconds} has passed"
    )
    return replace(decision, desired=held, reason=Reason.COLD_START, message=message)


def _paused(decision: Decision, pause: Pause | None, current: int) -> Decision:
    if pause is None:
        return decision
    if pause.invalid is not None:
        message = f"{pause.invalid}: holding {current} replica(s) until it is fixed or removed"
        return replace(decision, desired=current, reason=Reason.PAUSE_INVALID, message=message)
    if pause.replicas is None:
        message = f"paused by annotation {PAUSED}: holding {current} replica(s) (would be {decision.desired})"
        return replace(decision, desired=current, reason=Reason.PAUSED, message=message)
    message = (
        f"paused by annotation {PAUSED_REPLICAS}: {pause.replicas} replica(s) (would be {decision.desired})"
    )
    return replace(decision, desired=pause.replicas, reason=Reason.PAUSED, message=message)


def _scaled_up(
    state: ScalerState, decision: Decision, current: int, pause: Pause | None, now: float
) -> ScalerState:
    """Remember when the scaler itself last raised the count (a pause's count is the user's)."""
    if pause is None and decision.desired > current:
        return replace(state, scaled_up_at=now)
    return state


def parse_pause(annotations: Mapping[str, str] | None) -> Pause | None:
    """The pause annotations, as KEDA reads its own: ``paused-replicas`` wins over ``paused``."""
    annotations = annotations or {}
    replicas, paused = annotations.get(PAUSED_REPLICAS), annotations.get(PAUSED)
    if replicas is not None:
        value = replicas.strip()
        if not value.isdigit() or int(value) > MAX_PAUSED_REPLICAS:
            return Pause(
                invalid=f"{PAUSED_REPLICAS}: {replicas!r} is not an integer in 0..{MAX_PAUSED_REPLICAS}"
            )
        return Pause(replicas=int(value))
    if paused is None or paused.strip().lower() == "false":
        return None
    if paused.strip().lower() == "true":
        return Pause()
    return Pause(invalid=f'{PAUSED}: {paused!r} is neither "true" nor "false"')


def _sample(obs: Observation, ready: int) -> Sample:
    return Sample(obs.at, obs.entries_added, obs.entries_read, obs.pending, obs.lag, ready)
