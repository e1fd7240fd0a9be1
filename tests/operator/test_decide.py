"""The scaling decision: worked examples and properties over generated policies and histories."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from streamqueue import wire
from streamqueue_operator.decide import (
    Pause,
    Rates,
    Reason,
    Sample,
    ScalerState,
    decide,
    measure_rates,
    parse_pause,
)
from streamqueue_operator.models import ScalingSpec
from streamqueue_operator.observe import Observation


def policy(**kw: object) -> ScalingSpec:
    base: dict[str, object] = {
        "min_replicas": 0,
        "max_replicas": 20,
        "target_backlog_per_replica": 5,
        "scale_down_stabilization_seconds": 30,
        "idle_cooldown_seconds": 60,
    }
    return ScalingSpec(**{**base, **kw})


def obs(at: float, lag: int = 0, pending: int = 0, added: int = 0, read: int | None = 0) -> Observation:
    return Observation(
        at=at, lag=lag, pending=pending, entries_added=added, entries_read=read, stream_length=lag
    )


def test_backlog_target_scales_up_in_one_step() -> None:
    d, _ = decide(policy(), ScalerState.seeded(0, 1), obs(1, lag=40, pending=7), current=1, ready=1)
    assert d.desired == 10 and d.reason == Reason.BACKLOG
    assert "backlog 47" in d.message


def test_max_replicas_caps_and_says_so() -> None:
    d, _ = decide(policy(max_replicas=4), ScalerState.seeded(0, 1), obs(1, lag=1000), current=1, ready=1)
    assert d.desired == 4 and "clamped to [0, 4]" in d.message


def test_wakes_from_zero_on_first_message_and_on_pending_only() -> None:
    p = policy()
    assert decide(p, ScalerState(), obs(1, lag=1), current=0, ready=0)[0].desired == 1
    # KEDA's pending-count mode cannot wake on pending alone; a dead consumer's pending entries need a worker.
    d, _ = decide(p, ScalerState(), obs(1, pending=3), current=0, ready=0)
    assert d.desired == 1 and d.reason == Reason.ACTIVATION


def test_activation_threshold_keeps_zero_until_exceeded() -> None:
    p = policy(activation_backlog=10)
    assert decide(p, ScalerState(), obs(1, lag=10), current=0, ready=0)[0].desired == 0
    assert decide(p, ScalerState(), obs(1, lag=11), current=0, ready=0)[0].desired == 3


def test_scale_down_waits_for_stabilization_window() -> None:
    p = policy(scale_down_stabilization_seconds=30)
    state = ScalerState()
    d, state = decide(p, state, obs(0, lag=50), current=2, ready=2)
    assert d.desired == 10
    d, state = decide(p, state, obs(10, lag=5), current=10, ready=10)
    assert d.desired == 10 and d.reason == Reason.STABILIZED
    d, state = decide(p, state, obs(29, lag=5), current=10, ready=10)
    assert d.desired == 10
    d, state = decide(p, state, obs(31, lag=5), current=10, ready=10)
    assert d.desired == 1


def test_scale_to_zero_only_after_idle_cooldown() -> None:
    p = policy(idle_cooldown_seconds=60, scale_down_stabilization_seconds=10)
    state = ScalerState()
    _, state = decide(p, state, obs(0, lag=3, added=3), current=1, ready=1)
    for t in (5, 30, 59):
        d, state = decide(p, state, obs(t, added=3, read=3), current=1, ready=1)
        assert d.desired == 1, t
    d, state = decide(p, state, obs(61, added=3, read=3), current=1, ready=1)
    assert d.desired == 0 and d.reason == Reason.IDLE


def test_new_arrivals_reset_idle_cooldown_even_if_drained_between_polls() -> None:
    p = policy(idle_cooldown_seconds=60, scale_down_stabilization_seconds=0)
    state = ScalerState.seeded(0, 1)
    _, state = decide(p, state, obs(50, added=1, read=1), current=1, ready=1)
    _, state = decide(p, state, obs(100, added=9, read=9), current=1, ready=1)
    d, _ = decide(p, state, obs(130, added=9, read=9), current=1, ready=1)
    assert d.desired == 1


def test_restart_seed_prevents_early_scale_down() -> None:
    p = policy(scale_down_stabilization_seconds=30)
    d, _ = decide(p, ScalerState.seeded(100, 8), obs(101, lag=0), current=8, ready=8)
    assert d.desired == 8


def test_redis_error_holds_and_fallback_only_raises() -> None:
    err = Observation(at=5, error="ConnectionError: refused")
    d, state = decide(policy(), ScalerState.seeded(0, 3), err, current=3, ready=3)
    assert d.desired == 3 and d.reason == Reason.REDIS_UNAVAILABLE and "holding 3" in d.message
    assert state.recommendations == ((0, 3), (5, 3)) and state.samples == ()
    assert decide(policy(fallback_replicas=5), ScalerState(), err, current=3, ready=3)[0].desired == 5
    assert decide(policy(fallback_replicas=2), ScalerState(), err, current=3, ready=3)[0].desired == 3
    assert decide(policy(), ScalerState(), err, current=0, ready=0)[0].desired == 0


def test_missing_group_holds_but_wakes_a_worker_for_a_non_empty_stream() -> None:
    missing = Observation(at=1, group_missing=True, stream_length=4)
    assert decide(policy(), ScalerState(), missing, current=0, ready=0)[0].desired == 1
    d, _ = decide(policy(), ScalerState(), missing, current=4, ready=4)
    assert d.desired == 4 and d.reason == Reason.GROUP_MISSING
    empty = Observation(at=1, group_missing=True, stream_length=0)
    assert decide(policy(), ScalerState(), empty, current=0, ready=0)[0].desired == 0


def test_drain_target_uses_saturated_service_rate() -> None:
    # 2 ready replicas complete 20 entries/s in total while lag stays high: 10/s per replica.
    # Arrival 30/s plus a backlog of 600 to drain in 30 s needs (30 + 20) / 10 = 5 replicas.
    p = policy(target_backlog_per_replica=1000, target_drain_seconds=30)
    state = ScalerState()
    _, state = decide(p, state, obs(0, lag=500, added=1000, read=400, pending=10), current=2, ready=2)
    d, _ = decide(p, state, obs(10, lag=590, added=1300, read=600, pending=10), current=2, ready=2)
    assert d.rates == Rates(arrival=30.0, service_per_replica=10.0)
    assert d.drain_target == 5 and d.desired == 5 and d.reason == Reason.DRAIN_RATE


def test_no_service_rate_when_workers_were_not_saturated() -> None:
    samples = (Sample(0, 10, 10, 0, 0, 2), Sample(10, 20, 20, 0, 0, 2))
    assert measure_rates(samples) == Rates(arrival=1.0, service_per_replica=None)


def test_cold_start_holds_further_scale_up_until_pods_are_ready() -> None:
    p = policy(max_replicas=50, cold_start_seconds=60)
    d, state = decide(p, ScalerState.seeded(0, 1), obs(1, lag=20), current=1, ready=1)
    assert d.desired == 4 and d.reason == Reason.BACKLOG
    # backlog keeps growing while the 3 new pods start: they were added for it
    for t, lag in ((2, 30), (10, 60), (20, 90)):
        d, state = decide(p, state, obs(t, lag=lag), current=4, ready=1)
        assert d.desired == 4 and d.reason == Reason.COLD_START, t
        assert "3 of 4 pod(s) not Ready yet" in d.message
    d, state = decide(p, state, obs(21, lag=90), current=4, ready=4)  # ready: the policy applies again
    assert d.desired == 18 and d.reason == Reason.BACKLOG


def test_cold_start_hold_is_bounded_in_time_and_never_from_zero() -> None:
    p = policy(max_replicas=50, cold_start_seconds=30)
    _, state = decide(p, ScalerState.seeded(0, 1), obs(1, lag=20), current=1, ready=1)
    d, _ = decide(p, state, obs(30, lag=60), current=4, ready=1)
    assert d.reason == Reason.COLD_START
    d, _ = decide(p, state, obs(31, lag=60), current=4, ready=3)  # a pod stuck starting: 30 s is enough
    assert d.desired == 12 and d.reason == Reason.BACKLOG
    d, _ = decide(p, ScalerState(), obs(1, lag=20), current=0, ready=0)
    assert d.desired == 4 and d.reason == Reason.ACTIVATION
    off = policy(max_replicas=50, cold_start_seconds=0)
    _, state = decide(off, ScalerState.seeded(0, 1), obs(1, lag=20), current=1, ready=1)
    assert decide(off, state, obs(2, lag=60), current=4, ready=1)[0].desired == 12


def test_drain_target_uses_ready_pods_service_rate() -> None:
    """4 pods, 2 of them Ready and serving 10/s: 5/s per replica, not 2.5/s."""
    samples = (Sample(0, 0, 0, 0, 100, 2), Sample(10, 0, 100, 0, 100, 2))
    assert measure_rates(samples) == Rates(arrival=0.0, service_per_replica=5.0)


def test_pause_annotations_follow_kedas_semantics() -> None:
    assert parse_pause(None) is None and parse_pause({"streamqueue.io/paused": "false"}) is None
    assert parse_pause({"streamqueue.io/paused": "true"}) == Pause()
    both = {"streamqueue.io/paused": "true", "streamqueue.io/paused-replicas": "3"}
    assert parse_pause(both) == Pause(replicas=3)  # paused-replicas wins, as in KEDA
    for bad in ("-1", "two", "1.5", ""):
        pause = parse_pause({"streamqueue.io/paused-replicas": bad})
        assert pause is not None and pause.invalid and "paused-replicas" in pause.invalid, bad
    pause = parse_pause({"streamqueue.io/paused": "yes"})
    assert pause is not None and pause.invalid


def test_pause_holds_sets_or_refuses_and_history_keeps_advancing() -> None:
    p = policy(max_replicas=50)
    state = ScalerState.seeded(0, 2)
    d, state = decide(p, state, obs(1, lag=100), current=2, ready=2, pause=Pause())
    assert (d.desired, d.reason) == (2, Reason.PAUSED) and "would be 20" in d.message
    d, state = decide(p, state, obs(2, lag=100), current=2, ready=2, pause=Pause(replicas=0))
    assert (d.desired, d.reason) == (0, Reason.PAUSED)
    d, state = decide(p, state, obs(3, lag=100), current=0, ready=0, pause=Pause(invalid="bad"))
    assert (d.desired, d.reason) == (0, Reason.PAUSE_INVALID) and "bad" in d.message
    d, _ = decide(p, state, obs(4, lag=100), current=0, ready=0)  # removed: resumes at once
    assert d.desired == 20
    d, _ = decide(p, state, Observation(at=4, error="down"), current=2, ready=2, pause=Pause(replicas=5))
    assert d.desired == 5  # a pause is the user's word, Redis or not


def bound(o: Observation, reason: str = wire.LIMIT_REQUESTS) -> Observation:
    return replace(o, limit_bound=reason)


def test_limit_bound_holds_a_scale_up_and_says_why() -> None:
    p = policy(max_replicas=50)
    d, state = decide(p, ScalerState.seeded(0, 4), bound(obs(1, lag=100)), current=4, ready=4)
    assert (d.desired, d.reason) == (4, Reason.LIMIT_BOUND)
    assert "limit-bound (RequestsPerMinute)" in d.message and "holding 4 instead of 20" in d.message
    assert "backlog 100" in d.message
    d, _ = decide(p, state, obs(2, lag=100), current=4, ready=4)  # the key expired: the policy again
    assert (d.desired, d.reason) == (20, Reason.BACKLOG)


def test_limit_bound_changes_nothing_that_is_not_a_scale_up() -> None:
    p = policy(scale_down_stabilization_seconds=0, idle_cooldown_seconds=0)
    d, _ = decide(p, ScalerState.seeded(0, 4), bound(obs(1, lag=10)), current=4, ready=4)
    assert (d.desired, d.reason) == (2, Reason.BACKLOG)  # scale-down as usual
    d, _ = decide(p, ScalerState.seeded(0, 4), bound(obs(1, lag=20)), current=4, ready=4)
    assert (d.desired, d.reason) == (4, Reason.BACKLOG)  # settled: nothing held
    d, _ = decide(p, ScalerState(last_active_at=0), bound(obs(1)), current=1, ready=1)
    assert (d.desired, d.reason) == (0, Reason.IDLE)  # to zero as usual
    d, _ = decide(p, ScalerState(), bound(obs(1, lag=30)), current=0, ready=0)
    assert (d.desired, d.reason) == (1, Reason.LIMIT_BOUND)  # wakes from zero: the limit needs a worker
    d, _ = decide(policy(min_replicas=3), ScalerState(), bound(obs(1, lag=30)), current=2, ready=2)
    assert d.desired == 3  # minReplicas is the user's floor, bound or not


def test_limit_bound_with_cold_start_pause_and_missing_data() -> None:
    p = policy(max_replicas=50, cold_start_seconds=60, fallback_replicas=6)
    _, state = decide(p, ScalerState.seeded(0, 1), obs(1, lag=20), current=1, ready=1)
    d, _ = decide(p, state, bound(obs(2, lag=60)), current=4, ready=1)
    assert (d.desired, d.reason) == (4, Reason.LIMIT_BOUND)  # both hold; the reason that outlasts the other
    d, _ = decide(p, state, bound(obs(2, lag=60)), current=4, ready=4, pause=Pause(replicas=9))
    assert (d.desired, d.reason) == (9, Reason.PAUSED)  # a pause is the user's word
    err = bound(Observation(at=2, error="ConnectionError: refused"))
    assert decide(p, state, err, current=4, ready=4)[0].desired == 6  # unreadable: fallback as before
    missing = bound(Observation(at=2, group_missing=True, stream_length=3))
    assert decide(p, ScalerState(), missing, current=0, ready=0)[0].desired == 6


# --- properties ---------------------------------------------------------------------------------


@st.composite
def policies(draw: st.DrawFn) -> ScalingSpec:
    """A valid scaling policy: each field drawn from its own range, maxReplicas at least minReplicas."""
    min_replicas = draw(st.integers(0, 5))
    return ScalingSpec(
        min_replicas=min_replicas,
        max_replicas=max(1, min_replicas + draw(st.integers(0, 30))),
        target_backlog_per_replica=draw(st.integers(1, 50)),
        scale_down_stabilization_seconds=draw(st.integers(0, 120)),
        idle_cooldown_seconds=draw(st.integers(0, 300)),
        activation_backlog=draw(st.integers(0, 20)),
        target_drain_seconds=draw(st.integers(1, 120)),
        cold_start_seconds=draw(st.integers(0, 120)),
    )


@st.composite
def histories(draw: st.DrawFn) -> tuple[ScalingSpec, list[Observation]]:
    p = draw(policies())
    n = draw(st.integers(1, 25))
    t, added, read, out = 0.0, 0, 0, []
    for _ in range(n):
        t += draw(st.floats(0.2, 20))
        if draw(st.integers(0, 9)) == 0:
            out.append(Observation(at=t, error="ConnectionError"))
            continue
        added += draw(st.integers(0, 500))
        read = draw(st.integers(read, added))
        pending = draw(st.integers(0, read))
        out.append(
            Observation(
                at=t,
                lag=added - read,
                pending=pending,
                entries_added=added,
                entries_read=read,
                stream_length=added,
                lag_estimated=draw(st.booleans()),
            )
        )
    return p, out


Scenario = tuple[ScalingSpec, list[Observation], int]
PROPERTY = settings(max_examples=300, deadline=None)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """A policy, a history, and a starting replica count inside the policy's bounds."""
    p, observations = draw(histories())
    return p, observations, min(max(draw(st.integers(0, 40)), p.min_replicas), p.max_replicas)


def run(p: ScalingSpec, observations: list[Observation], current: int) -> list[tuple[Observation, int, int]]:
    """Feed a history through decide, applying each decision; returns (obs, before, after)."""
    state, steps = ScalerState.seeded(0.0, current), []
    for o in observations:
        d, state = decide(p, state, o, current=current, ready=current)
        steps.append((o, current, d.desired))
        current = d.desired
    return steps


@PROPERTY
@given(scenarios())
def test_never_outside_min_max(scenario: Scenario) -> None:
    p, observations, start = scenario
    for _, _, after in run(p, observations, start):
        assert p.min_replicas <= after <= p.max_replicas


@PROPERTY
@given(scenarios())
def test_never_scales_to_zero_while_backlog_waits(scenario: Scenario) -> None:
    p, observations, start = scenario
    for o, before, after in run(p, observations, start):
        if o.ok and o.backlog > 0 and before > 0:
            assert after >= 1
        if o.ok and o.backlog > p.activation_backlog:
            assert after >= 1


@PROPERTY
@given(scenarios())
def test_errors_never_scale_down(scenario: Scenario) -> None:
    p, observations, start = scenario
    for o, before, after in run(p, observations, start):
        if not o.ok:
            assert after >= before


@PROPERTY
@given(scenarios())
def test_no_scale_down_inside_stabilization_window(scenario: Scenario) -> None:
    """A scale-down never goes below what any poll inside the window called for: the backlog target of
    an observed poll, the count held through an error, the count found at start. Going to zero after
    the idle cooldown is allowed once nothing in the window needed more than one replica."""
    p, observations, start = scenario
    needs: list[tuple[float, int]] = [(0.0, start)]
    for o, before, after in run(p, observations, start):
        if o.ok:
            needs.append(
                (
                    o.at,
                    min(max(-(-o.backlog // p.target_backlog_per_replica), p.min_replicas), p.max_replicas),
                )
            )
        else:
            needs.append((o.at, after))
        if after < before:
            floor = max(n for t, n in needs if t > o.at - p.scale_down_stabilization_seconds or t == o.at)
            assert after >= floor or (after == 0 and floor <= 1), (floor, before, after)


@PROPERTY
@given(scenarios(), st.lists(st.integers(0, 40), min_size=25, max_size=25))
def test_no_scale_up_while_pods_start(scenario: Scenario, starting: list[int]) -> None:
    """With pods not Ready, a scale-up that follows the scaler's own earlier one within coldStartSeconds
    never happens; every other property still holds (never outside [min, max])."""
    p, observations, current = scenario
    state, scaled_up_at = ScalerState.seeded(0.0, current), None
    for o, n in zip(observations, starting, strict=False):
        ready = max(0, current - n)
        d, state = decide(p, state, o, current=current, ready=ready)
        assert p.min_replicas <= d.desired <= p.max_replicas
        in_cold_start = scaled_up_at is not None and o.at - scaled_up_at < p.cold_start_seconds
        if ready < current and in_cold_start and current >= p.min_replicas:
            assert d.desired <= current, (o, current, ready, d)
        if d.desired > current:
            scaled_up_at = o.at
        current = d.desired


@PROPERTY
@given(histories(), st.integers(0, 40), st.integers(0, 5000), st.integers(0, 5000))
def test_monotone_in_backlog(
    history: tuple[ScalingSpec, list[Observation]], current: int, lag_a: int, lag_b: int
) -> None:
    p, observations = history
    current = min(max(current, p.min_replicas), p.max_replicas)
    state = ScalerState.seeded(0.0, current)
    for o in observations[:-1]:
        _, state = decide(p, state, o, current=current, ready=current)
    last = observations[-1]
    if not last.ok:
        return
    low, high = sorted((lag_a, lag_b))
    d_low, _ = decide(p, state, Observation(**{**last.__dict__, "lag": low}), current=current, ready=current)
    d_high, _ = decide(
        p, state, Observation(**{**last.__dict__, "lag": high}), current=current, ready=current
    )
    assert d_low.desired <= d_high.desired


@PROPERTY
@given(
    scenarios(),
    st.lists(st.integers(0, 40), min_size=25, max_size=25),
    st.lists(st.booleans(), min_size=25, max_size=25),
)
def test_limit_bound_only_holds_scale_ups(
    scenario: Scenario, starting: list[int], bounds: list[bool]
) -> None:
    """A bound observation never yields more than the current count (a queue at zero still wakes, to one
    worker or minReplicas), and never less than what the same poll unbound asks, or the current count."""
    p, observations, current = scenario
    state = ScalerState.seeded(0.0, current)
    for o, n, is_bound in zip(observations, starting, bounds, strict=False):
        ready = max(0, current - n)
        free, _ = decide(p, state, o, current=current, ready=ready)
        held, next_state = decide(p, state, bound(o), current=current, ready=ready)
        assert held.desired <= free.desired
        assert held.desired >= min(free.desired, current)
        if o.ok:
            assert held.desired <= max(current, p.min_replicas, 1 if current == 0 else 0), (o, current, held)
        else:
            assert held == free  # nothing was observed: the no-data rules alone
        state = next_state if is_bound else decide(p, state, o, current=current, ready=ready)[1]
        current = held.desired if is_bound else free.desired
