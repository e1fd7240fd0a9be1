"""Jittered exponential backoff for the worker's own retry loops (Redis outages)."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from ``base`` to ``cap``; jitter keeps a fleet from reconnecting in step."""

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self.base = base
        self.cap = cap
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2**self._attempt)
        self._attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0
