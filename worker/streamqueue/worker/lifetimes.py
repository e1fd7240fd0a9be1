"""Which reply streams get their lifetime step in a commit: each at most once per refresh period.

The lifetime step (the commit script's ``XINFO GROUPS``, then ``PERSIST`` if a consumer group reads
the stream, else ``EXPIRE``: see ``outbox``) used to run for every stream in every batch. A user
receiving many replies, or a reply streaming many chunks, paid it again and again, and the no-op
worker lost about 10 % of its throughput to it. A stream's TTL only has to be renewed before it runs
out, so the step runs when a stream is written for the first time in ``refresh`` (a tenth of the
TTL, at most a minute), and is skipped otherwise.

Invalidation: a stream's entry lapses after ``refresh``. What that allows, all within ``refresh`` of
a change, and only while replies keep coming (the step runs on the first write after it):
- a group created on a stream with a TTL keeps that TTL until the step runs (the TTL, renewed by
  each step, is ten times longer, so the group is never lost to it while its user gets replies);
- a group destroyed leaves the stream persistent until the step runs;
- a stream deleted by someone (``DEL``) and recreated by the next reply has no TTL until then.
A stream expires between TTL - ``refresh`` and TTL after its last reply.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .outbox import StreamWrite

MAX_REFRESH_S = 60.0


def refresh_s(ttl_s: int) -> float:
    """How long a stream's lifetime step holds: a tenth of its TTL, at most ``MAX_REFRESH_S``."""
    return min(ttl_s / 10, MAX_REFRESH_S)


class LifetimeSteps:
    """The reply streams whose lifetime step ran lately, and until when it holds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}  # stream -> when its step is due again; oldest first

    def __len__(self) -> int:
        return len(self._until)

    def due(self, writes: Iterable[StreamWrite]) -> set[str]:
        """The streams among ``writes`` (those with a TTL) whose lifetime step must run now."""
        now = self._clock()
        self._forget_lapsed(now)
        return {w.key for w in writes if w.ttl_s is not None and self._until.get(w.key, 0.0) <= now}

    def done(self, writes: Iterable[StreamWrite], due: set[str]) -> None:
        """The steps of ``due`` among ``writes`` are committed: they hold for ``refresh_s`` from now."""
        now = self._clock()
        for write in writes:
            if write.key in due and write.ttl_s is not None:
                self._until.pop(write.key, None)  # re-inserted last: the dict stays in time order
                self._until[write.key] = now + refresh_s(write.ttl_s)

    def _forget_lapsed(self, now: float) -> None:
        while self._until:
            oldest = next(iter(self._until))
            if self._until[oldest] > now:
                return
            del self._until[oldest]
