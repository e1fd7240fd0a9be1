"""Hold Events (stabilization, cold start, limit-bound, pause): on change only, never one per poll."""

from __future__ import annotations

from typing import Any

from streamqueue_operator.decide import HOLDS, Decision, Reason
from streamqueue_operator.scaler import HOLD_EVENTS, QueueScaler
from streamqueue_operator.settings import OperatorSettings


def test_holds_are_announced_on_change_only() -> None:
    scaler = QueueScaler(Any, OperatorSettings(status_min_interval=10), "ns", "q")  # type: ignore[arg-type]
    sent: list[tuple[str, str]] = []

    def poll(reason: Reason, desired: int, current: int, at: float) -> None:
        scaler._announce_hold(
            Decision(desired, reason, "why"), current, at, lambda t, r, m: sent.append((t, r))
        )

    for t in range(5):
        poll(Reason.STABILIZED, 4, 4, t)  # waiting for the window, poll after poll
    poll(Reason.BACKLOG, 5, 4, 5)
    poll(Reason.STABILIZED, 5, 5, 6)  # flapping back within a few minutes: not again
    for t in range(7, 10):
        poll(Reason.COLD_START, 5, 5, t)
    poll(Reason.LIMIT_BOUND, 5, 5, 10)
    poll(Reason.LIMIT_BOUND, 5, 5, 10.5)
    for t in range(10, 13):
        poll(Reason.PAUSED, 5, 5, t)
    poll(Reason.PAUSE_INVALID, 5, 5, 13)
    poll(Reason.BACKLOG, 5, 5, 14)
    assert sent == [
        ("Normal", "ScaleDownDelayed"),
        ("Normal", "ColdStartHold"),
        ("Normal", "LimitBound"),
        ("Normal", "Paused"),
        ("Warning", "InvalidPauseAnnotation"),
        ("Normal", "Resumed"),
    ]


def test_every_hold_has_its_event() -> None:
    assert set(HOLD_EVENTS) == HOLDS
