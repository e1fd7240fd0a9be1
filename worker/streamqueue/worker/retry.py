"""What becomes of an entry that is not committed: its last handler error is kept, it is
dead-lettered once past maxDeliveries (or when invalid), and with per-user order it is tried again
in place after a backoff, ahead of its user's next entries."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable

from redis.backoff import ExponentialBackoff

from .. import wire
from ..metrics import WorkerMetrics
from ..settings import WorkerSettings
from .commit import Commit, Commits
from .outbox import StreamWrite
from .reclaim import Delivery
from .replies import dead_letter_fields, error_reply_fields

log = logging.getLogger("streamqueue.worker")
# Last handler error per entry, kept for the dead-letter record; bounded so failures cannot grow it.
_LAST_ERRORS_KEPT = 10_000
# With per-user order a failed entry is retried in place (its user's later entries wait for it):
# 0.1, 0.2, 0.4 ... 5 s after its successive failures (redis-py's curve, no jitter: one entry waits).
_ORDERED_RETRY = ExponentialBackoff(cap=5.0, base=0.1)


class Failures:
    """Failed and invalid entries of one partition stream."""

    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics, *, stream: str) -> None:
        self.s = settings
        self.metrics = metrics
        self.stream = stream
        self.dead_letter_stream = settings.dead_letter(stream)
        self._last_errors: OrderedDict[str, str] = OrderedDict()

    def failed(self, entry: Delivery, exc: Exception) -> None:
        """The handler raised: count it, and keep the error for a dead-letter record."""
        self.metrics.failed.inc()
        errors = self._last_errors
        errors[entry.entry_id] = f"{type(exc).__name__}: {exc}"
        errors.move_to_end(entry.entry_id)
        while len(errors) > _LAST_ERRORS_KEPT:
            errors.popitem(last=False)
        log.warning(
            "handler failed on %s (user %s, delivery %d of %d): %s: %s",
            entry.entry_id, entry.fields.get(wire.USER_ID), entry.deliveries, self.s.max_deliveries,
            type(exc).__name__, exc,
        )  # fmt: skip

    def forget(self, entry_id: str) -> None:
        """The entry is answered (or cancelled): its earlier errors no longer matter."""
        self._last_errors.pop(entry_id, None)

    def exhausted(self, entry: Delivery) -> Commit | None:
        """The dead letter of an entry past maxDeliveries, with the last error seen here; else None."""
        if entry.deliveries <= self.s.max_deliveries:
            return None
        error = (
            self._last_errors.pop(entry.entry_id, None) or "the handler did not succeed (error not seen here)"
        )
        return self.dead_letter(entry, wire.REASON_MAX_DELIVERIES, error, entry.deliveries - 1)

    def dead_letter(self, entry: Delivery, reason: str, error: str, deliveries: int) -> Commit:
        """The dead-letter record (and the user's error reply, if allowed) to commit with the XACK."""
        s = self.s
        fields = entry.fields
        record = dead_letter_fields(
            fields, reason=reason, error=error, deliveries=deliveries, source_id=entry.entry_id,
            source_stream=self.stream, consumer=s.consumer,
        )  # fmt: skip
        writes = [StreamWrite(self.dead_letter_stream, record, s.dead_letter_max_len, count_trimmed=True)]
        user_id = fields.get(wire.USER_ID)
        if s.error_replies and wire.user_id_rejection(user_id) is None:
            reply = error_reply_fields(s.consumer, fields.get(wire.REQUEST_ID), f"{reason}: {error}")
            key = wire.reply_stream(s.reply_prefix, user_id or "")
            writes.append(StreamWrite(key, reply, s.reply_maxlen, s.reply_ttl_seconds))

        def dead_lettered() -> None:
            self.metrics.dead_lettered.labels(reason).inc()
            log.warning(
                "dead-lettered %s to %s: %s (%s)", entry.entry_id, self.dead_letter_stream, reason, error
            )

        return writes, dead_lettered


class Retries:
    """What happens to an entry that ends without a commit (its handler failed).

    It stays pending. In order mode it is retried here, ahead of its user's next entries (they
    wait); elsewhere another delivery (a reclaim) retries it.
    """

    def __init__(
        self, commits: Commits, run: Callable[[Delivery], None], stop: asyncio.Event, *, in_place: bool
    ) -> None:
        """``run`` runs an entry again; ``in_place``: per-user order (retry here, not by a reclaim)."""
        self._commits = commits
        self._run = run
        self._stop = stop
        self._in_place = in_place
        self._due: dict[str, asyncio.TimerHandle] = {}  # failed entries due again

    def not_committed(self, entry: Delivery) -> None:
        if self._in_place and not self._stop.is_set():
            again = Delivery(entry.entry_id, entry.fields, entry.deliveries + 1)
            delay = _ORDERED_RETRY.compute(entry.deliveries - 1)
            self._due[entry.entry_id] = asyncio.get_running_loop().call_later(delay, self._retry, again)
            return
        self._commits.finished(entry, committed=False)

    def _retry(self, entry: Delivery) -> None:
        del self._due[entry.entry_id]
        if self._stop.is_set():
            self._commits.finished(entry, committed=False)
        else:
            self._run(entry)

    def cancel(self) -> None:
        """At the end of the run: failed entries due for another try stay pending instead."""
        for handle in self._due.values():
            handle.cancel()
        self._due.clear()
