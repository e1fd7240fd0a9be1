"""One entry's processing: check it, run the handler on it (cancellable, its chunks streamed) and
say what to commit for it: the reply, a ``cancelled`` or ``expired`` reply or a dead letter (None:
it failed)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import KW_ONLY, dataclass
from functools import partial
from typing import Any

from .. import tracing, wire
from ..handlers import Handler, Message
from ..metrics import WorkerMetrics
from ..settings import WorkerSettings
from .cancel import Flight
from .chunks import ChunkWriter
from .commit import Commit
from .expiry import expired_reason
from .inflight import InFlight
from .outbox import StreamWrite
from .reclaim import Delivery
from .replies import reply_fields, unanswered_fields
from .retry import Failures

log = logging.getLogger("streamqueue.worker")


@dataclass(eq=False)
class EntryProcessor:
    """Turns an entry of one partition stream into what to commit with its XACK."""

    s: WorkerSettings
    handler: Handler
    metrics: WorkerMetrics
    _: KW_ONLY
    stream: str
    chunks: ChunkWriter
    inflight: InFlight
    failures: Failures

    def __post_init__(self) -> None:
        max_age_s = self.s.max_queue_age_seconds
        self._max_age_ms = None if max_age_s is None else max_age_s * 1000
        self.tracer = tracing.tracer(self.s.otel_tracing, "streamqueue-worker")
        # What to commit for an entry; with tracing off, ``_process`` itself (no wrapper's await).
        self.process: Callable[[Delivery], Awaitable[Commit | None]] = (
            self._process if self.tracer is None else self._process_traced
        )

    async def _process_traced(self, entry: Delivery) -> Commit | None:
        """``_process`` under the entry's spans (``tracing.EntrySpans``)."""
        assert self.tracer is not None
        spans = tracing.EntrySpans(self.tracer, entry.entry_id, entry.fields, self.stream, entry.deliveries)
        with spans.processing():
            commit = await self._process(entry, spans)
        if commit is None:
            spans.failed()
            return None
        return spans.committing(*commit)

    async def _process(self, entry: Delivery, spans: tracing.EntrySpans | None = None) -> Commit | None:
        """What to commit for this entry (writes, then a step to run once committed), or None.

        Every delivery comes here (new, reclaimed, retried in place), so each is checked for
        expiry before its handler runs. An expired entry is answered ``expired`` even past
        maxDeliveries: its user is gone, and a dead letter would only be redriven to expire again.
        """
        s = self.s
        entry_id, fields = entry.entry_id, entry.fields
        rejection = wire.validate_request(fields, s.max_message_bytes)
        if rejection is not None:
            return self.failures.dead_letter(entry, rejection.reason, rejection.detail, entry.deliveries)
        flight = self.inflight.flight(entry_id)
        if flight is not None and flight.cancelled:
            return self._cancelled(entry, ran=False)
        if self._max_age_ms is not None or wire.DEADLINE in fields:
            reason = expired_reason(entry_id, fields, self._max_age_ms, time.time() * 1000)
            if reason is not None:
                return self._expired(entry, reason)
        exhausted = self.failures.exhausted(entry)
        if exhausted is not None:
            return exhausted
        msg = Message(
            id=entry_id,
            stream=self.stream,
            user_id=fields[wire.USER_ID],
            message=fields[wire.MESSAGE],
            request_id=fields.get(wire.REQUEST_ID),
            deliveries=entry.deliveries,
            fields=fields,
        )
        started = time.perf_counter()
        try:
            answer = self._answer(msg) if flight is None else self._answer_cancellable(msg, flight)
            writes = await (answer if spans is None else spans.handler(answer))
        except Exception as exc:
            self.failures.failed(entry, exc)
            return None
        finally:
            self.metrics.handler_latency.observe(time.perf_counter() - started)
        if writes is None:
            return self._cancelled(entry, ran=True)
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

    def _cancelled(self, entry: Delivery, *, ran: bool) -> Commit:
        """The ``cancelled`` final reply, committed with the entry's XACK."""
        request_id = entry.fields.get(wire.REQUEST_ID)

        def cancelled() -> None:
            log.info(
                "entry %s (request %s) cancelled %s",
                entry.entry_id, request_id, "while running" if ran else "before it ran",
            )  # fmt: skip

        reply = unanswered_fields(self.s.consumer, request_id, wire.CANCELLED, wire.CANCELLED_YES)
        return self._unanswered(entry, reply, cancelled)

    def _expired(self, entry: Delivery, reason: str) -> Commit:
        """The ``expired`` final reply, committed with the entry's XACK; counted once committed."""
        request_id = entry.fields.get(wire.REQUEST_ID)

        def expired() -> None:
            self.metrics.expired.labels(reason).inc()
            log.info("entry %s (request %s) expired (%s) before it ran", entry.entry_id, request_id, reason)

        reply = unanswered_fields(self.s.consumer, request_id, wire.EXPIRED, reason)
        return self._unanswered(entry, reply, expired)

    def _traced(self, reply: dict[str, str]) -> dict[str, str]:
        """The reply with the request's trace id when tracing is on (the current span's trace)."""
        if self.tracer is not None:
            from opentelemetry.trace import get_current_span

            reply[wire.TRACE_ID] = tracing.trace_id(get_current_span())
        return reply

    def _unanswered(self, entry: Delivery, reply: dict[str, str], done: Callable[[], None]) -> Commit:
        """A final reply in place of the handler's; ``done`` runs once it is committed."""
        s = self.s
        key = wire.reply_stream(s.reply_prefix, entry.fields[wire.USER_ID])

        def committed() -> None:
            self.failures.forget(entry.entry_id)
            done()

        return [StreamWrite(key, self._traced(reply), s.reply_maxlen, s.reply_ttl_seconds)], committed

    def _answered(self, entry_id: str) -> None:
        self.failures.forget(entry_id)
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
            text = await self._stream_chunks(outcome, msg, key)
            result = {**msg.final_fields, wire.RESPONSE: text} if msg.final_fields else text
        else:
            result = await outcome
        reply = self._traced(reply_fields(s.consumer, msg.request_id, result))
        return [StreamWrite(key, reply, s.reply_maxlen, s.reply_ttl_seconds)]

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


def _uncancel(task: asyncio.Task[Any], flight: Flight) -> int:
    """Take back the cancellations made on ``flight``'s account; the cancellations left (others')."""
    remaining = task.cancelling()
    for _ in range(flight.hits):
        remaining = task.uncancel()
    flight.hits = 0
    return remaining
