"""The operator's rollout stagger: turns ``interval`` apart, kept once given, never a wait at 0."""

from __future__ import annotations

import pytest
from streamqueue_operator.stagger import RolloutDeferred, RolloutStagger


@pytest.mark.parametrize(
    ("interval", "asks", "waits"),
    [
        # three queues asking at once: 0, then one interval, then two
        (30.0, [("a", 0.0), ("b", 0.0), ("c", 0.0)], [0.0, 30.0, 60.0]),
        # a queue that asks again early keeps its turn and only hears how long is left
        (30.0, [("a", 0.0), ("b", 0.0), ("b", 10.0), ("c", 10.0), ("b", 30.0)], [0.0, 30.0, 20.0, 50.0, 0.0]),
        # a late asker after the others' turns are over goes at once
        (30.0, [("a", 0.0), ("b", 100.0)], [0.0, 0.0]),
        # a queue whose turn came rolls out; its next change waits a whole interval after the last turn
        (30.0, [("a", 0.0), ("a", 5.0)], [0.0, 25.0]),
        # 0: no stagger at all
        (0.0, [("a", 0.0), ("b", 0.0), ("c", 0.0)], [0.0, 0.0, 0.0]),
    ],
)
def test_turns(interval: float, asks: list[tuple[str, float]], waits: list[float]) -> None:
    stagger = RolloutStagger(interval)
    assert [stagger.wait(key, now) for key, now in asks] == waits


def test_take_raises_with_the_delay_until_the_turn() -> None:
    stagger = RolloutStagger(30.0)
    stagger.take("a", 0.0)
    with pytest.raises(RolloutDeferred) as raised:
        stagger.take("b", 12.0)
    assert raised.value.delay == 18.0
    assert "one queue every 30s" in str(raised.value)
    stagger.take("b", 30.0)  # its turn: no exception
