"""One partition's consumer run: read, handle concurrently, answer and acknowledge, reclaim, drain.

Four tasks share the worker's Redis client (each blocking read holds its own pooled connection):
the reader (XREADGROUP ``>`` in batches sized to the free in-flight slots), the reclaimer
(XAUTOCLAIM of entries idle past the claim time), the renewer (keeps long handlers' entries from
looking idle) and the outbox flusher (reply XADDs, their streams' lifetime and the XACK). Entries run
concurrently on a ``ConsumerPool`` (no task per entry); the in-flight limit (``Slots``) is this
partition's share of the worker's (a shared pool would let a partition blocked on an empty read hold
slots that a busy one needs). With per-user order a ``UserOrder`` gate holds a
user's next entry until the previous one is committed, and a failed entry is retried in place.
Setting the run's stop event starts the drain: reading stops, in-flight entries get the grace
period, whatever is still unfinished is handed back to the group, and ``until_stopped`` returns.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from redis.exceptions import ResponseError

from .. import wire
from ..connection import CONNECTION_ERRORS, Backoff, RedisClient, group_missing, transient
from ..handlers import Handler, Message
from ..metrics import WorkerMetrics
from ..settings import WorkerSettings
from .cancel import CancelWatch, Flight, cancelled_fields
from .chunks import ChunkWriter
from .consumers import ConsumerPool
from .fairness import FairPending, FairQueue
from .outbox import Outbox, OutboxAbandoned, StreamWrite
from .reclaim import Delivery, PendingOwnership
from .replies import dead_letter_fields, error_reply_fields, reply_fields
from .slots import Slots
from .userorder import UserOrder

log = logging.getLogger("streamqueue.worker")
# Last handler error per entry, kept for the dead-letter record; bounded so failures cannot grow it.
_LAST_ERRORS_KEPT = 10_000
_CANCEL_PATIENCE_S = 1.0
# With per-user order a failed entry is retried in place (its user's later entries wait for it).
_ORDERED_RETRY_BASE_S = 0.1
_ORDERED_RETRY_CAP_S = 5.0
# What finishing an entry takes: the writes to commit with its XACK, and a step once committed.
_Commit = tuple[list[StreamWrite], Callable[[], None]]


class Run:
    """One partition stream consumed by this worker: its tasks and in-flight entries."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: RedisClient,
        handler: Handler,
        metrics: WorkerMetrics,
        *,
        stream: str,
        concurrency: int,
        takeover: bool = False,
        cancels: CancelWatch | None = None,
    ) -> None:
        """``takeover``: this worker just got the partition's lease, so everything pending in it
        belongs to a previous holder that is gone; the first reclaim scan takes it all, in order,
        before any new entry is read. ``cancels``: the worker's watch of cancelled requests (None:
        requests cannot be cancelled)."""
        s = settings
        self.s = s
        self.stream = stream
        self.redis = redis
        self.handler = handler
        self.metrics = metrics
        self.ready = False
        self.reading = False  # an XREADGROUP/XAUTOCLAIM is on the wire
        self.stop = asyncio.Event()
        self.inflight: set[str] = set()  # ids taken from Redis and not yet committed or given up
        self.idle = asyncio.Event()  # set while nothing is in flight (the drain waits for it)
        self.idle.set()
        self.last_errors: OrderedDict[str, str] = OrderedDict()
        self.dead_letter_stream = s.dead_letter(stream)
        self.slots = Slots(concurrency)
        self.order = UserOrder() if s.ordering == "perUser" else None
        self.consumers: ConsumerPool[Delivery] = ConsumerPool(self._entry, "streamqueue-consumer")
        self.outbox = Outbox(redis, stream, s.group, metrics)
        self.chunks = ChunkWriter(self.outbox)
        self.fair: FairQueue | None = None
        if s.fairness == "perUser":
            self.fair = FairQueue(redis, stream, s.group, block_ms=s.block_ms)
            self.pending: PendingOwnership = FairPending(redis, stream, s.group, s.consumer, s.claim_idle_ms)
        else:
            self.pending = PendingOwnership(redis, stream, s.group, s.consumer, s.claim_idle_ms)
        self._takeover = takeover
        self._retries: dict[str, asyncio.TimerHandle] = {}  # order mode: failed entries due again
        self.cancels = cancels
        self._flights: dict[str, Flight] = {}  # entry id -> its cancel state, while in flight

    async def until_stopped(self, stop: asyncio.Event) -> None:
        self.stop = stop
        flusher = asyncio.create_task(self.outbox.run(), name="streamqueue-outbox")
        renewer = asyncio.create_task(self._renew_loop(), name="streamqueue-renew")
        intake = asyncio.create_task(self._intake_loop(), name="streamqueue-intake")
        stopper = asyncio.create_task(stop.wait())
        fair = None
        if self.fair is not None:
            fair = asyncio.create_task(self.fair.run_intake(stop), name="streamqueue-fair-intake")
        background = [flusher, renewer, intake, *([fair] if fair is not None else [])]
        done, _ = await asyncio.wait([stopper, *background], return_when=asyncio.FIRST_COMPLETED)
        crashed = next((t for t in done if t is not stopper), None)
        stopper.cancel()
        log.info("%s: draining %d in-flight entries", self.stream, len(self.inflight))
        await self._stop_intake(intake)
        if fair is not None:  # it ends by itself once its blocking read returns
            await asyncio.wait([fair], timeout=self.s.block_ms / 1000 + _CANCEL_PATIENCE_S)
        await self._drain()
        await self._hand_back()
        await cancel(*(task for task in background if task is not intake))
        self._cancel_retries()
        if crashed is not None and not crashed.cancelled() and crashed.exception() is not None:
            raise RuntimeError(f"worker task {crashed.get_name()} failed") from crashed.exception()

    # --- intake -------------------------------------------------------------------------------

    async def _intake_loop(self) -> None:
        """Fill free slots: reclaim idle pending entries when a scan is due, otherwise read new ones.

        One loop does both so reclaiming never starves behind a reader that holds every free slot
        while it blocks, and the in-flight limit holds exactly.
        """
        s = self.s
        backoff = Backoff()
        group_ready = False
        reclaim_due = 0.0  # scan once at start: a restarted pod's orphans should not wait
        while not self.stop.is_set():
            if not group_ready:
                group_ready = await self._redis_call(self._ensure_group, backoff)
                continue
            n = await self.slots.take(s.batch_size)
            self.reading = True
            try:
                if time.monotonic() >= reclaim_due:
                    min_idle = 0 if self._takeover else None
                    entries, wrapped = await self.pending.claim(n, mine=self.inflight, min_idle_ms=min_idle)
                    if entries:
                        self.metrics.reclaimed.inc(len(entries))
                        log.info(
                            "reclaimed %d idle entries (%s, delivery %d, ...)",
                            len(entries), entries[0].entry_id, entries[0].deliveries,
                        )  # fmt: skip
                    if wrapped:
                        self._takeover = False
                        reclaim_due = time.monotonic() + self._reclaim_interval_s
                else:
                    entries = await self._read_new(n)
                await self._check_cancels(entries)
            except Exception as exc:
                self.slots.give(n)
                if group_missing(exc):
                    log.warning("group %s on %s is gone (Redis restarted?); recreating", s.group, self.stream)
                    group_ready = False
                    continue
                if not transient(exc):
                    raise
                await self._redis_down(exc, backoff)
                continue
            except BaseException:
                self.slots.give(n)
                raise
            finally:
                self.reading = False
            backoff.reset()
            self.ready = True
            self.slots.give(n - len(entries))
            for entry in entries:
                self._start(entry)

    async def _check_cancels(self, entries: list[Delivery]) -> None:
        """Track the batch's entries for cancels, then check them all with one call."""
        if self.cancels is None or not entries:
            return
        for entry in entries:
            if entry.entry_id in self._flights:  # retried in place, or redelivered to us
                continue
            flight = self.cancels.track(entry.fields.get(wire.USER_ID), entry.fields.get(wire.REQUEST_ID))
            if flight is not None:
                self._flights[entry.entry_id] = flight
        await self.cancels.check(self._flights.get(e.entry_id) for e in entries)

    @property
    def _reclaim_interval_s(self) -> float:
        """Scan the pending list a few times per claim idle period (at most every 5 s)."""
        return min(max(self.s.claim_idle_ms / 2000, 0.05), 5.0)

    async def _read_new(self, count: int) -> list[Delivery]:
        s = self.s
        if self.fair is not None:
            return await self.fair.take(count, s.consumer)
        # RESP2 reply with decoded text: [[stream, [(id, {field: value}), ...]]] or None on timeout.
        reply: Any = await self.redis.xreadgroup(
            s.group, s.consumer, {self.stream: ">"}, count=count, block=s.block_ms
        )
        return [Delivery(i, f, 1) for _, stream_entries in reply or [] for i, f in stream_entries]

    async def _ensure_group(self) -> None:
        """Create the group at the stream's start (id 0) so entries sent before it existed are served."""
        try:
            await self.redis.xgroup_create(self.stream, self.s.group, id="0", mkstream=True)
            log.info("created group %s on %s", self.s.group, self.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _redis_call(self, call: Callable[[], Awaitable[None]], backoff: Backoff) -> bool:
        """Run ``call``; on a connection error back off and return False so the caller retries."""
        try:
            await call()
        except Exception as exc:
            if not transient(exc):
                raise
            await self._redis_down(exc, backoff)
            return False
        backoff.reset()
        return True

    async def _redis_down(self, exc: Exception, backoff: Backoff) -> None:
        self.ready = False
        self.metrics.redis_errors.inc()
        delay = backoff.next_delay()
        log.warning("Redis unreachable (%s: %s); retrying in %.2fs", type(exc).__name__, exc, delay)
        await asyncio.sleep(delay)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.s.renew_interval_s)
            if not self.inflight:
                continue
            try:
                await self.pending.renew(list(self.inflight))
            except Exception as exc:
                if transient(exc):
                    log.warning("claim renewal failed, Redis unreachable: %s", exc)
                elif not group_missing(exc):
                    raise
                # Redis lost the group (restart without persistence): nothing of ours is pending any
                # more; the intake loop recreates the group.

    # --- one entry ----------------------------------------------------------------------------

    def _start(self, entry: Delivery) -> None:
        """Queue one entry on the consumer pool; the caller has taken its slot.

        The slot (and the entry's place in ``inflight``, which keeps its claim renewed) is given back
        when the entry is committed, or at once if it ends without a commit (handler failure). With
        per-user order an entry whose user has one in flight waits, holding its slot, for its turn.
        """
        self.inflight.add(entry.entry_id)
        self.idle.clear()
        if self.order is None or self.order.admit(entry):
            self.consumers.submit(entry)

    async def _entry(self, entry: Delivery) -> None:
        handed_over = False
        try:
            commit = await self._process(entry.entry_id, entry.fields, entry.deliveries)
            if commit is not None:
                writes, after = commit
                self.outbox.submit(entry.entry_id, writes, partial(self._committed, entry, after))
                handed_over = True
        except Exception:
            log.exception("entry %s: unexpected error; it stays pending", entry.entry_id)
        finally:
            if not handed_over:
                self._not_committed(entry)

    def _committed(self, entry: Delivery, after: Callable[[], None], error: BaseException | None) -> None:
        if error is None:
            after()
        elif isinstance(error, OutboxAbandoned):
            log.warning(
                "entry %s left pending: its reply could not be written before shutdown", entry.entry_id
            )
        else:
            log.error("entry %s left pending: commit failed: %s", entry.entry_id, error)
        self._finished(entry, committed=error is None)

    def _not_committed(self, entry: Delivery) -> None:
        """A failed entry stays pending. In order mode it is retried here, ahead of its user's next
        entries (they wait); elsewhere another delivery (a reclaim) retries it."""
        if self.order is not None and not self.stop.is_set():
            retry = Delivery(entry.entry_id, entry.fields, entry.deliveries + 1)
            delay = min(_ORDERED_RETRY_BASE_S * 2 ** (entry.deliveries - 1), _ORDERED_RETRY_CAP_S)
            self._retries[entry.entry_id] = asyncio.get_running_loop().call_later(delay, self._retry, retry)
            return
        self._finished(entry, committed=False)

    def _retry(self, entry: Delivery) -> None:
        del self._retries[entry.entry_id]
        if self.stop.is_set():
            self._finished(entry, committed=False)
        else:
            self.consumers.submit(entry)

    def _finished(self, entry: Delivery, *, committed: bool) -> None:
        """The entry is committed or given up: free its slot, and let its user's next entry run.

        In order mode, a user whose entry was given up (at a stop) keeps the rest of their entries
        pending too: the partition's next holder must handle them after that one, not before.
        """
        self._release([entry])
        if self.order is not None:
            if committed:
                following = self.order.done(entry)
                if following is not None:
                    self.consumers.submit(following)
            else:
                self._release(self.order.drop(entry))

    def _release(self, entries: list[Delivery]) -> None:
        for entry in entries:
            self.inflight.discard(entry.entry_id)
            flight = self._flights.pop(entry.entry_id, None)
            if flight is not None and self.cancels is not None:
                self.cancels.untrack(flight)
        self.slots.give(len(entries))
        if not self.inflight:
            self.idle.set()

    def _cancel_retries(self) -> None:
        """At the end of the run: failed entries due for another try stay pending instead."""
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()

    async def _process(self, entry_id: str, fields: dict[str, str], deliveries: int) -> _Commit | None:
        """What to commit for this entry (writes, then a step to run once committed), or None."""
        s = self.s
        rejection = wire.validate_request(fields, s.max_message_bytes)
        if rejection is not None:
            return self._dead_letter(entry_id, fields, rejection.reason, rejection.detail, deliveries)
        flight = self._flights.get(entry_id)
        if flight is not None and flight.cancelled:
            return self._cancelled(entry_id, fields, ran=False)
        if deliveries > s.max_deliveries:
            error = (
                self.last_errors.pop(entry_id, None) or "the handler did not succeed (error not seen here)"
            )
            return self._dead_letter(entry_id, fields, wire.REASON_MAX_DELIVERIES, error, deliveries - 1)
        msg = Message(
            id=entry_id,
            stream=self.stream,
            user_id=fields[wire.USER_ID],
            message=fields[wire.MESSAGE],
            request_id=fields.get(wire.REQUEST_ID),
            deliveries=deliveries,
            fields=fields,
        )
        started = time.perf_counter()
        try:
            writes = await (self._answer(msg) if flight is None else self._answer_cancellable(msg, flight))
        except Exception as exc:
            self.metrics.failed.inc()
            self._remember_error(entry_id, f"{type(exc).__name__}: {exc}")
            log.warning(
                "handler failed on %s (user %s, delivery %d of %d): %s: %s",
                entry_id, msg.user_id, deliveries, s.max_deliveries, type(exc).__name__, exc,
            )  # fmt: skip
            return None
        finally:
            self.metrics.handler_latency.observe(time.perf_counter() - started)
        if writes is None:
            return self._cancelled(entry_id, fields, ran=True)
        return writes, partial(self._answered, entry_id)

    async def _answer_cancellable(self, msg: Message, flight: Flight) -> list[StreamWrite] | None:
        """``_answer``, or None if the request was cancelled while its handler ran.

        A cancel cancels the task running this (a consumer of the pool): the handler sees
        ``CancelledError``, which ends here, and the consumer goes on with its next entry. A
        cancellation from anyone else (the drain at shutdown) propagates as before.
        """
        task = asyncio.current_task()
        assert task is not None
        flight.task = task
        try:
            writes = await self._answer(msg)
        except asyncio.CancelledError:
            if not flight.hits:
                raise
            if _uncancel(task, flight) > 0:  # cancelled by someone else as well
                raise
            return None
        finally:
            flight.task = None
        if flight.hits:  # the handler (or a library) swallowed the CancelledError and returned
            _uncancel(task, flight)
        return None if flight.cancelled else writes

    def _cancelled(self, entry_id: str, fields: dict[str, str], *, ran: bool) -> _Commit:
        """The ``cancelled`` final reply, committed with the entry's XACK."""
        s = self.s
        key = wire.reply_stream(s.reply_prefix, fields[wire.USER_ID])
        reply = cancelled_fields(s.consumer, fields.get(wire.REQUEST_ID))

        def cancelled() -> None:
            self.last_errors.pop(entry_id, None)
            log.info(
                "entry %s (request %s) cancelled %s",
                entry_id, fields.get(wire.REQUEST_ID), "while running" if ran else "before it ran",
            )  # fmt: skip

        return [StreamWrite(key, reply, s.reply_maxlen, s.reply_ttl_seconds)], cancelled

    def _answered(self, entry_id: str) -> None:
        self.last_errors.pop(entry_id, None)
        self.metrics.processed.inc()

    async def _answer(self, msg: Message) -> list[StreamWrite]:
        """Call the handler; stream its chunks if it yields them; return the final reply write."""
        s = self.s
        key = wire.reply_stream(s.reply_prefix, msg.user_id)
        outcome = self.handler(msg)
        result: str | Mapping[str, Any]
        if inspect.iscoroutine(outcome):  # the common case, and a far cheaper test than the ABC below
            result = await outcome
        elif isinstance(outcome, AsyncIterator):
            result = await self._stream_chunks(outcome, msg, key)
        else:
            result = await outcome
        return [
            StreamWrite(
                key, reply_fields(s.consumer, msg.request_id, result), s.reply_maxlen, s.reply_ttl_seconds
            )
        ]

    async def _stream_chunks(self, chunks: AsyncIterator[str], msg: Message, key: str) -> str:
        """Queue each chunk as it is produced (if enabled) and return the whole text for the final reply.

        Chunks go through the outbox with every other reply's (``chunks.ChunkWriter``): the handler
        waits only when too much is queued. The first chunk gives the stream its lifetime as a reply
        would, so a handler that fails halfway leaves no key without a TTL behind.
        """
        s = self.s
        parts: list[str] = []
        stream = self.chunks.reply(key, s.consumer, msg.request_id, s.reply_maxlen, s.reply_ttl_seconds)
        try:
            async for chunk in chunks:
                text = str(chunk)
                if s.stream_replies:
                    await stream.write(text)
                parts.append(text)
        finally:
            if isinstance(chunks, AsyncGenerator):  # stopped early (cancel, failed write): close it now
                await chunks.aclose()
        await stream.written()  # the final reply must follow its chunks, and not hide a lost one
        return "".join(parts)

    def _dead_letter(
        self, entry_id: str, fields: dict[str, str], reason: str, error: str, deliveries: int
    ) -> _Commit:
        """The dead-letter record (and the user's error reply, if allowed) to commit with the XACK."""
        s = self.s
        record = dead_letter_fields(
            fields, reason=reason, error=error, deliveries=deliveries, source_id=entry_id,
            source_stream=self.stream, consumer=s.consumer,
        )  # fmt: skip
        writes = [StreamWrite(self.dead_letter_stream, record)]
        user_id = fields.get(wire.USER_ID)
        if s.error_replies and wire.user_id_rejection(user_id) is None:
            reply = error_reply_fields(s.consumer, fields.get(wire.REQUEST_ID), f"{reason}: {error}")
            key = wire.reply_stream(s.reply_prefix, user_id or "")
            writes.append(StreamWrite(key, reply, s.reply_maxlen, s.reply_ttl_seconds))

        def dead_lettered() -> None:
            self.metrics.dead_lettered.labels(reason).inc()
            log.warning("dead-lettered %s to %s: %s (%s)", entry_id, self.dead_letter_stream, reason, error)

        return writes, dead_lettered

    def _remember_error(self, entry_id: str, error: str) -> None:
        errors = self.last_errors
        errors[entry_id] = error
        errors.move_to_end(entry_id)
        while len(errors) > _LAST_ERRORS_KEPT:
            errors.popitem(last=False)

    # --- shutdown -----------------------------------------------------------------------------

    async def _stop_intake(self, intake: asyncio.Task[None]) -> None:
        """Stop taking work. A read already on the wire may have been delivered to this consumer by
        Redis: let it return (BLOCK bounds the wait) so its entries are handled here, not handed back.
        """
        if self.reading:
            patience = min(self.s.block_ms / 1000 + _CANCEL_PATIENCE_S, self.s.shutdown_grace_seconds)
            await asyncio.wait([intake], timeout=patience)
        await cancel(intake)

    async def _drain(self) -> None:
        """Give in-flight entries the grace period; cancel what is left (it stays pending)."""
        try:
            await asyncio.wait_for(self.idle.wait(), timeout=self.s.shutdown_grace_seconds)
        except TimeoutError:
            log.warning(
                "grace period over: %d entries unfinished are handed back to the group", len(self.inflight)
            )
            self.outbox.abandon()
        await cancel(*self.consumers.tasks)  # also the idle ones, parked until cancelled

    async def _hand_back(self) -> None:
        """Hand back every entry this consumer still owns, so other workers take it over at once."""
        try:
            released = await asyncio.wait_for(self.pending.release_all(), timeout=5)
        except (*CONNECTION_ERRORS, ResponseError, TimeoutError) as exc:
            log.warning("could not hand back pending entries (they will be reclaimed when idle): %s", exc)
            return
        if released:
            log.info("%s: handed back %d pending entries to group %s", self.stream, released, self.s.group)


def _uncancel(task: asyncio.Task[Any], flight: Flight) -> int:
    """Take back the cancellations made on ``flight``'s account; the cancellations left (others')."""
    remaining = task.cancelling()
    for _ in range(flight.hits):
        remaining = task.uncancel()
    flight.hits = 0
    return remaining


async def cancel(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait for them to end, asking again if a cancellation got lost.

    A cancellation that lands exactly as a library call times out can be turned into an ordinary
    error (and retried) instead of ending the task; shutdown must not hang on that.
    """
    for task in tasks:
        task.cancel()
    pending = {task for task in tasks if not task.done()}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=_CANCEL_PATIENCE_S)
        for task in pending:
            where = io.StringIO()
            task.print_stack(limit=4, file=where)
            log.warning(
                "task %s ignored cancellation; cancelling again\n%s", task.get_name(), where.getvalue()
            )
            task.cancel()
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a failure is reported by the caller, not as "never retrieved"
