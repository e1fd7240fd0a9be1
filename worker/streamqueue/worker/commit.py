"""Finishing an entry: its writes go to the outbox with its XACK; once that ends, what the entry held
is freed (slot, claim, cancel watch) and, with per-user order, its user's next entry runs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from .inflight import InFlight
from .outbox import Outbox, OutboxAbandoned, StreamWrite
from .reclaim import Delivery
from .userorder import UserOrder

log = logging.getLogger("streamqueue.worker")

# What finishing an entry takes: the writes to commit with its XACK, and a step once committed.
Commit = tuple[list[StreamWrite], Callable[[], None]]


class Commits:
    """Hands processed entries to the outbox and frees each one's place when its commit ends."""

    def __init__(
        self, outbox: Outbox, inflight: InFlight, order: UserOrder | None, run: Callable[[Delivery], None]
    ) -> None:
        """``order``: the per-user order gate (None without order); ``run`` runs an entry it admits."""
        self._outbox = outbox
        self._inflight = inflight
        self._order = order
        self._run = run

    def submit(self, entry: Delivery, commit: Commit) -> None:
        """Commit ``entry``'s writes with its XACK; its place is freed once that succeeds or fails."""
        writes, after = commit
        self._outbox.submit(entry.entry_id, writes, partial(self._committed, entry, after))

    def _committed(self, entry: Delivery, after: Callable[[], None], error: BaseException | None) -> None:
        if error is None:
            after()
        elif isinstance(error, OutboxAbandoned):
            log.warning(
                "entry %s left pending: its reply could not be written before shutdown", entry.entry_id
            )
        else:
            log.error("entry %s left pending: commit failed: %s", entry.entry_id, error)
        self.finished(entry, committed=error is None)

    def finished(self, entry: Delivery, *, committed: bool) -> None:
        """The entry is committed or given up: free its place, and let its user's next entry run.

        In order mode, a user whose entry was given up (at a stop) keeps the rest of their entries
        pending too: the partition's next holder must handle them after that one, not before.
        """
        self._inflight.release([entry])
        if self._order is not None:
            if committed:
                following = self._order.done(entry)
                if following is not None:
                    self._run(following)
            else:
                self._inflight.release(self._order.drop(entry))
