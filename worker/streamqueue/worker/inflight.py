"""What a partition's run holds from Redis right now: its entries in flight, their slots and their
cancel watches."""

from __future__ import annotations

import asyncio

from .. import wire
from .cancel import CancelWatch, Flight
from .reclaim import Delivery
from .slots import Slots


class InFlight:
    """Entries taken from Redis and not yet committed or given up.

    Their ids keep their claims renewed and stay out of reclaim scans; each holds one of the
    partition's slots (its share of the worker's in-flight limit); each may be watched for a cancel.
    ``idle`` is set while none is held: the drain waits for it.
    """

    def __init__(self, concurrency: int, cancels: CancelWatch | None) -> None:
        """``cancels``: the worker's watch of cancelled requests (None: they cannot be cancelled)."""
        self.slots = Slots(concurrency)
        self.ids: set[str] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self._cancels = cancels
        self._flights: dict[str, Flight] = {}  # entry id -> its cancel state

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, entry: Delivery) -> None:
        """``entry`` was taken from Redis; the caller has taken its slot."""
        self.ids.add(entry.entry_id)
        self.idle.clear()

    def flight(self, entry_id: str) -> Flight | None:
        """The entry's cancel state, if it is watched."""
        return self._flights.get(entry_id)

    async def check_cancels(self, entries: list[Delivery]) -> None:
        """Watch the batch's entries for cancels, then check them all with one call (watching first:
        a cancel published while the check is on the wire is not lost)."""
        if self._cancels is None or not entries:
            return
        for entry in entries:
            if entry.entry_id in self._flights:  # retried in place, or redelivered to us
                continue
            flight = self._cancels.track(entry.fields.get(wire.USER_ID), entry.fields.get(wire.REQUEST_ID))
            if flight is not None:
                self._flights[entry.entry_id] = flight
        await self._cancels.check(self._flights.get(e.entry_id) for e in entries)

    def release(self, entries: list[Delivery]) -> None:
        """``entries`` are committed or given up: free their slots, stop renewing and watching them."""
        for entry in entries:
            self.ids.discard(entry.entry_id)
            flight = self._flights.pop(entry.entry_id, None)
            if flight is not None and self._cancels is not None:
                self._cancels.untrack(flight)
        self.slots.give(len(entries))
        if not self.ids:
            self.idle.set()
