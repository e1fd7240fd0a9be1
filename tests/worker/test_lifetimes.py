"""The lifetime step of each reply stream runs at most once per refresh period (pure logic)."""

from __future__ import annotations

from streamqueue.worker.lifetimes import MAX_REFRESH_S, LifetimeSteps, refresh_s
from streamqueue.worker.outbox import StreamWrite


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_stream_is_due_again_only_after_its_refresh_period() -> None:
    clock = Clock()
    steps = LifetimeSteps(clock)
    reply = StreamWrite("ai_to_user:a", {}, ttl_s=100)
    chunk = StreamWrite("ai_to_user:a", {})  # no TTL: never takes a step
    assert steps.due([chunk]) == set()
    due = steps.due([reply, chunk])
    assert due == {"ai_to_user:a"}
    steps.done([reply], due)
    clock.now += refresh_s(100) - 0.001
    assert steps.due([reply]) == set()
    clock.now += 0.001
    assert steps.due([reply]) == {"ai_to_user:a"}
    assert len(steps) == 0  # lapsed entries are forgotten


def test_a_step_not_committed_stays_due() -> None:
    steps = LifetimeSteps(Clock())
    first, second = StreamWrite("k1", {}, ttl_s=60), StreamWrite("k2", {}, ttl_s=60)
    due = steps.due([first, second])
    steps.done([first], due)  # the commit took only the first
    assert steps.due([first, second]) == {"k2"}


def test_the_refresh_period_is_a_tenth_of_the_ttl_at_most_a_minute() -> None:
    assert refresh_s(10) == 1
    assert refresh_s(3600) == MAX_REFRESH_S == 60
