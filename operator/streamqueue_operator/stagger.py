"""Space out the worker rollouts the operator causes itself, one queue at a time.

An operator upgrade can change every queue's rendered pod template at once: a new default worker
image (``--worker-image`` follows the operator's version) or a change in how the Deployment is
rendered. Rolled out together, every queue would surge and drain at the same moment. A rollout the
user asked for (a StreamQueue spec change) is not the operator's to delay and is never staggered.
"""

from __future__ import annotations

import math
from collections.abc import Hashable


class RolloutDeferred(Exception):
    """This queue's turn to roll out has not come yet; ``delay`` seconds until it has."""

    def __init__(self, delay: float, interval: float) -> None:
        super().__init__(
            f"pod template changed by the operator, not by the spec: rolling out in {delay:.0f}s "
            f"(operator-caused rollouts start one queue every {interval:g}s)"
        )
        self.delay = delay


class RolloutStagger:
    """Turns for rollouts, ``interval`` seconds apart, first come first served; ``interval`` 0 is no wait.

    A queue keeps the turn it was given (asking again before then only says how long is left), so
    queues that retry at their time cannot keep each other waiting.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next_free = -math.inf
        self._booked: dict[Hashable, float] = {}

    def wait(self, key: Hashable, now: float) -> float:
        """Seconds until ``key`` may roll out; 0 means now, and uses up its turn."""
        slot = self._booked.get(key)
        if slot is None:
            slot = max(now, self._next_free)
            self._next_free = slot + self.interval
        if slot <= now:
            self._booked.pop(key, None)
            return 0.0
        self._booked[key] = slot
        return slot - now

    def take(self, key: Hashable, now: float) -> None:
        """Raise ``RolloutDeferred`` unless it is ``key``'s turn (``wait`` for the exception's caller)."""
        delay = self.wait(key, now)
        if delay > 0:
            raise RolloutDeferred(delay, self.interval)
