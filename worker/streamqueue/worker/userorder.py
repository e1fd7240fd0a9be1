"""Per-user order inside one worker: a user's next entry runs only once the previous one is done.

Entries of one partition arrive in stream order, and with per-user order a partition has one
consumer at a time (leases), so holding each user's later entries until the earlier one commits is
all it takes for that user's messages to be handled one at a time, in the order they were sent.
Users stay concurrent with each other. An entry without a user id is invalid and only dead-lettered:
it waits for nobody.
"""

from __future__ import annotations

from collections import deque

from .. import wire
from .reclaim import Delivery


class UserOrder:
    """Which users have an entry in flight, and the entries of theirs waiting behind it."""

    def __init__(self) -> None:
        self._waiting: dict[str, deque[Delivery]] = {}

    def admit(self, entry: Delivery) -> bool:
        """True if ``entry`` may run now; else it waits behind its user's entry in flight."""
        user = entry.fields.get(wire.USER_ID)
        if user is None:
            return True
        queue = self._waiting.get(user)
        if queue is not None:
            queue.append(entry)
            return False
        self._waiting[user] = deque()
        return True

    def done(self, entry: Delivery) -> Delivery | None:
        """``entry`` is committed: its user's next entry, which may run now (None if none waits)."""
        user = entry.fields.get(wire.USER_ID)
        queue = self._waiting.get(user) if user is not None else None
        if not queue:
            self._waiting.pop(user or "", None)
            return None
        return queue.popleft()

    def drop(self, entry: Delivery) -> list[Delivery]:
        """``entry`` was given up: its user's waiting entries, which must not run before it now."""
        user = entry.fields.get(wire.USER_ID)
        return list(self._waiting.pop(user, None) or ()) if user is not None else []
