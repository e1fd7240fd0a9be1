"""What a client reads from a reply stream, as values: entries (``Reply``), streamed chunks (``Chunk``)
and their order, entry ids compared, and the errors a reply raises."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .. import wire


class ReplyError(Exception):
    """The worker answered with an error reply (e.g. the request was dead-lettered)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.error)
        self.reply = reply


class RequestCancelled(ReplyError):
    """The request was cancelled (``Client.cancel``): its final entry says ``cancelled``."""

    def __init__(self, reply: Reply) -> None:
        Exception.__init__(self, f"request {reply.request_id} was cancelled")
        self.reply = reply


class RequestExpired(ReplyError):
    """The request's time ran out before a worker ran it (the queue's maxQueueAgeSeconds or the
    request's ``deadline``): its final entry says ``expired``, and ``reason`` which limit
    (``wire.EXPIRED_QUEUE_AGE`` or ``wire.EXPIRED_DEADLINE``)."""

    def __init__(self, reply: Reply) -> None:
        Exception.__init__(self, f"request {reply.request_id} expired before it ran ({reply.expired})")
        self.reply = reply
        self.reason = reply.expired


@dataclass(frozen=True)
class Reply:
    """One entry of a user's reply stream: a final reply, an error reply or a streamed chunk."""

    entry_id: str
    fields: dict[str, str]

    @property
    def request_id(self) -> str | None:
        return self.fields.get(wire.REQUEST_ID)

    @property
    def response(self) -> str | None:
        return self.fields.get(wire.RESPONSE)

    @property
    def error(self) -> str | None:
        return self.fields.get(wire.ERROR)

    @property
    def cancelled(self) -> bool:
        """The final entry of a cancelled request (its ``response`` is empty)."""
        return self.fields.get(wire.CANCELLED) == wire.CANCELLED_YES

    @property
    def expired(self) -> str | None:
        """On the final entry of an expired request (its ``response`` is empty): which limit it was
        past, ``wire.EXPIRED_QUEUE_AGE`` or ``wire.EXPIRED_DEADLINE``; else None."""
        return self.fields.get(wire.EXPIRED)

    @property
    def worker_id(self) -> str | None:
        return self.fields.get(wire.WORKER_ID)

    @property
    def trace_id(self) -> str | None:
        """The request's OpenTelemetry trace id (32 hex digits), on a final reply from a tracing worker."""
        return self.fields.get(wire.TRACE_ID)

    @property
    def usage(self) -> dict[str, Any] | None:
        """The model's token usage (``prompt_tokens``, ``completion_tokens``, ``total_tokens``) on the final
        entry of a model call whose server reported it; None otherwise (or if unreadable)."""
        raw = self.fields.get(wire.USAGE)
        if raw is None:
            return None
        try:
            usage = json.loads(raw)
        except ValueError:
            return None
        return usage if isinstance(usage, dict) else None

    @property
    def chunk(self) -> str | None:
        return self.fields.get(wire.CHUNK)

    @property
    def seq(self) -> int | None:
        raw = self.fields.get(wire.SEQ)
        return int(raw) if raw is not None else None

    @property
    def offset(self) -> int | None:
        """Characters of the reply before this chunk entry's text (format 2; None from older workers)."""
        raw = self.fields.get(wire.OFFSET)
        return int(raw) if raw is not None else None

    @property
    def is_chunk(self) -> bool:
        """Chunk entries precede the final entry; the final one carries the whole response (or the error)."""
        return (
            wire.CHUNK in self.fields and wire.RESPONSE not in self.fields and wire.ERROR not in self.fields
        )


class Chunk(str):
    """A streamed reply chunk (a ``str``) that knows the reply-stream entry it came from.

    ``entry_id`` is what a reconnecting reader passes as ``after`` to resume right behind this chunk.
    """

    entry_id: str

    def __new__(cls, text: str, entry_id: str) -> Chunk:
        chunk = super().__new__(cls, text)
        chunk.entry_id = entry_id
        return chunk


class ReplyStream(AsyncIterator[Chunk]):
    """What ``Client.request_stream`` returns: the reply's chunks, in order; once they are all read,
    ``final`` is the final entry (its ``usage``, ``trace_id``, ``worker_id``), or None when the stream
    ended without one being read (resumed behind it, or closed early)."""

    def __init__(self) -> None:
        self.final: Reply | None = None
        self.chunks: AsyncGenerator[Chunk, None] | None = None  # set once, by request_stream

    def __aiter__(self) -> ReplyStream:
        return self

    def __anext__(self) -> Awaitable[Chunk]:
        assert self.chunks is not None
        return self.chunks.__anext__()  # no frame of its own: this is every streamed token's path

    async def aclose(self) -> None:
        """Stop reading (the request is no longer awaited); the request itself goes on: see ``cancel``."""
        assert self.chunks is not None
        await self.chunks.aclose()


S = TypeVar("S", bound=str)


class ChunkOrder(Generic[S]):
    """Puts streamed chunks back in sequence order and drops repeats.

    Entries of one stream arrive in the order they were written, but a request redelivered after a
    worker crash streams again from sequence 0, and nothing forbids a handler's writes from racing.
    """

    def __init__(self, next_seq: int = 0) -> None:
        self.next_seq = next_seq
        self._early: dict[int, S] = {}

    def add(self, seq: int | None, chunk: S) -> list[S]:
        """Record one chunk (no ``seq``: the next one) and return the chunks now ready, in order."""
        seq = self.next_seq if seq is None else seq
        if seq >= self.next_seq:
            self._early[seq] = chunk
        ready = []
        while self.next_seq in self._early:
            ready.append(self._early.pop(self.next_seq))
            self.next_seq += 1
        return ready


class TextOrder:
    """Puts chunk entries of format 2 back together by ``offset``: each character of the reply once, in
    order.

    A worker joins chunks that wait together into one entry, so a redelivered request (which streams
    again from the start) may cut its text differently: an entry that overlaps what was yielded gives
    only its new tail.
    """

    def __init__(self, next_offset: int = 0) -> None:
        self.next_offset = next_offset
        self.started = next_offset > 0  # something was yielded (or skipped, on resume)
        self._early: dict[int, Chunk] = {}

    def add(self, offset: int, chunk: Chunk) -> list[Chunk]:
        """Record one entry's text and return the chunks now ready, in order (empty text adds nothing)."""
        if offset == self.next_offset and chunk and not self._early:  # the usual case: next in line
            self.next_offset += len(chunk)
            self.started = True
            return [chunk]
        if offset + len(chunk) > self.next_offset:
            kept = self._early.get(offset)
            if kept is None or len(chunk) > len(kept):
                self._early[offset] = chunk
        ready: list[Chunk] = []
        while True:
            start = next((o for o in self._early if o <= self.next_offset), None)
            if start is None:
                return ready
            chunk = self._early.pop(start)
            skip = self.next_offset - start
            if skip < len(chunk):
                ready.append(chunk if skip == 0 else Chunk(chunk[skip:], chunk.entry_id))
                self.next_offset += len(chunk) - skip
                self.started = True


class ReplyOrder:
    """The chunks of one streamed reply, in order and once each: by ``offset`` (entry format 2), or by
    ``seq`` for entries of workers that write format 1."""

    def __init__(self, from_start: bool) -> None:
        """``from_start``: the reply is read from its beginning (else the first entry sets where)."""
        self._by_seq: ChunkOrder[Chunk] | None = ChunkOrder() if from_start else None
        self._by_offset: TextOrder | None = TextOrder() if from_start else None
        # A reply whose handler streamed nothing yields its final response as its one chunk.
        self.final_is_whole = from_start

    @classmethod
    def after(cls, last: Reply) -> ReplyOrder:
        """Resuming right behind chunk entry ``last``."""
        order = cls(from_start=False)
        order._by_seq = ChunkOrder((last.seq or 0) + 1)
        if last.offset is not None:
            order._by_offset = TextOrder(last.offset + len(last.chunk or ""))
        return order

    def add(self, reply: Reply) -> list[Chunk]:
        """Record chunk entry ``reply``; the chunks now ready, in order."""
        chunk = Chunk(reply.chunk or "", reply.entry_id)
        offset = reply.offset
        if offset is None:
            if self._by_seq is None:
                self._by_seq = ChunkOrder(reply.seq or 0)
            ready = self._by_seq.add(reply.seq, chunk)
            self.final_is_whole = self.final_is_whole and self._by_seq.next_seq == 0
            return ready
        if self._by_offset is None:
            self._by_offset = TextOrder(offset)
        ready = self._by_offset.add(offset, chunk)
        self.final_is_whole = self.final_is_whole and not self._by_offset.started
        return ready
