"""Streamed reply chunks: written through the outbox, in order, within a bound on what is queued.

A streaming handler's chunks used to be one XADD each, awaited one by one: a round trip per chunk and
a pooled connection per streaming reply (1,000 streaming replies exhausted the worker's connection
pool). Here every chunk joins the outbox's queue (``Outbox.send``), so one flush writes the chunks of
all in-flight replies in one script call (a pipeline per node on a cluster), and a handler goes on
with its next chunk without waiting for Redis. Order holds per reply stream because one queue is
flushed in order by one flusher, and the final reply is queued only once its chunks are written.

What may be queued and not yet written is bounded (chunks and characters of chunk text, across every
reply of the run):
past the bound a handler waits in ``write``, so a slow or unreachable Redis holds the model streams
back instead of growing the worker's memory.

The first chunk of a reply carries the reply's TTL, so its stream gets the lifetime rule a reply gets
(expire, or PERSIST if a group reads it) in the same flush: a handler that fails halfway leaves no
stream without a TTL behind; the later chunks carry none (no lifetime work per chunk).

Coalescing (``chunk_flush_ms`` > 0): the outbox holds chunks up to that long so that one flush carries
many; a chunk whose reply already has an entry waiting in the queue is appended to that entry instead
of making one more. A model streaming a token every 20 ms then costs one entry per flush window, not
per token, and each entry's ``offset`` (characters of the reply before it) lets a reader put a
redelivered reply's differently cut entries together exactly once (chunk entry format 2,
docs/worker.md "Chunk entries").
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial

from .. import wire
from .outbox import Outbox, StreamWrite
from .replies import chunk_fields

# Chunks queued and not yet written, across every streaming reply of a run: enough for a few flushes
# (the outbox writes up to 500 entries per call), small enough that a stalled Redis costs little memory.
MAX_QUEUED_CHUNKS = 4096
MAX_QUEUED_TEXT = 8 * 1024 * 1024  # characters


class ChunkWriter:
    """Queues the chunks of every streaming reply of one run on its outbox, within a bound."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        max_chunks: int = MAX_QUEUED_CHUNKS,
        max_text: int = MAX_QUEUED_TEXT,
    ) -> None:
        self.outbox = outbox
        self.max_chunks = max_chunks
        self.max_text = max_text
        self.queued = 0  # chunks handed to the outbox and not yet reported
        self.queued_text = 0
        self._room = asyncio.Event()
        self._room.set()

    def reply(
        self, key: str, worker_id: str, request_id: str | None, maxlen: int | None, ttl_s: int | None
    ) -> ReplyChunks:
        """The chunk writer of one reply, to the reply stream ``key``."""
        return ReplyChunks(self, key, worker_id, request_id, maxlen, ttl_s)

    async def _reserve(self, size: int) -> None:
        """Wait until one more chunk of ``size`` characters fits (a chunk alone always fits), then take it."""
        while not self._fits(size):
            self._room.clear()
            await self._room.wait()
        self.queued += 1
        self.queued_text += size

    def _fits(self, size: int) -> bool:
        if self.queued == 0:
            return True
        return self.queued < self.max_chunks and self.queued_text + size <= self.max_text

    def _release(self, chunks: int, size: int) -> None:
        self.queued -= chunks
        self.queued_text -= size
        self._room.set()


@dataclass(eq=False)
class ReplyChunks:
    """One reply's chunks: ``write`` each in turn, then ``written`` before the final reply is queued."""

    writer: ChunkWriter
    key: str  # the reply stream
    worker_id: str
    request_id: str | None
    maxlen: int | None
    ttl_s: int | None  # the reply stream's lifetime, set by the first chunk

    def __post_init__(self) -> None:
        self.count = 0  # entries written or queued; the next entry's sequence number
        self._offset = 0  # characters of the reply queued so far
        self._open: _OpenEntry | None = None  # the entry still waiting in the queue, open to more text
        self._unconfirmed = 0
        self._error: BaseException | None = None
        self._confirmed = asyncio.Event()
        self._confirmed.set()

    async def write(self, text: str) -> None:
        """Queue the next chunk, once there is room; raises if an earlier chunk could not be written.

        With coalescing on, a chunk joins this reply's entry that still waits in the queue, if any.
        """
        self._raise_failure()
        size = len(text)
        await self.writer._reserve(size)
        self._offset += size
        if self._open is not None:
            self._open.add(text, size)
            return
        fields = chunk_fields(self.worker_id, self.request_id, text, self.count, self._offset - size)
        # The first chunk sets the stream's lifetime; the final reply renews it.
        ttl_s = self.ttl_s if self.count == 0 else None
        self.count += 1
        self._unconfirmed += 1
        self._confirmed.clear()
        write = StreamWrite(self.key, fields, self.maxlen, ttl_s)
        entry = _OpenEntry(fields, text, size)
        if self.writer.outbox.chunk_flush_s > 0:
            self._open = entry
        # The first entry goes with the next flush, without waiting: the time to first token is kept.
        self.writer.outbox.send(write, partial(self._done, entry), self._taken, urgent=self.count == 1)

    def _taken(self) -> None:
        """A flush took the open entry: its text is final, the next chunk starts a new entry."""
        if self._open is not None:
            self._open.close()
            self._open = None

    async def written(self) -> None:
        """Wait until every chunk queued is written; raises why one was not (the entry stays pending)."""
        await self._confirmed.wait()
        self._raise_failure()

    def _done(self, entry: _OpenEntry, error: BaseException | None) -> None:
        self.writer._release(entry.chunks, entry.size)
        if error is not None and self._error is None:
            self._error = error
        self._unconfirmed -= 1
        if self._unconfirmed == 0:
            self._confirmed.set()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise ChunkWriteFailed(f"a chunk of this reply was not written: {self._error}") from self._error


class _OpenEntry:
    """One chunk entry and the chunks it holds: more join it until a flush takes it (``close``)."""

    def __init__(self, fields: dict[str, str], text: str, size: int) -> None:
        self.fields = fields
        self.parts = [text]
        self.chunks = 1
        self.size = size

    def add(self, text: str, size: int) -> None:
        self.parts.append(text)
        self.chunks += 1
        self.size += size

    def close(self) -> None:
        if self.chunks > 1:
            self.fields[wire.CHUNK] = "".join(self.parts)
        self.parts = []


class ChunkWriteFailed(RuntimeError):
    """A streamed chunk could not be written; the handler's delivery fails (the entry stays pending)."""
