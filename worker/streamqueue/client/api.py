"""``Client``, the API: send requests into the input stream, await or stream their replies, cancel them."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from .. import tracing as traces
from .. import wire
from ..connection import RedisClient, RedisConnection, connect_any
from .reads import ReplyReaders, UserReader, Waiter
from .replies import Chunk, Reply, ReplyError, ReplyOrder, ReplyStream, RequestCancelled, RequestExpired
from .sends import BatchedSends

# How long one reader XREAD blocks; an idle reader notices it has nobody to serve after at most this.
DEFAULT_BLOCK_MS = 2000
# The least time between two reads of the same reply streams (see ``reads``): none by default, since
# pacing costs every chunk up to the interval and, on a loaded machine, more at p99 (docs/benchmarks.md).
DEFAULT_READ_INTERVAL_MS = 0
# Non-blocking commands (XADD, XREVRANGE) share this many connections however many requests run at
# once; the blocking reads of reply streams hold a few more (see ``reads``).
_COMMAND_CONNECTIONS = 32
# Entries per XRANGE when a resuming reader catches up with what it missed.
_CATCH_UP_PAGE = 500


class Client:
    """Async client for a streamqueue: ``send``, ``request``, ``request_stream`` and ``responses``.

    Use as ``async with Client("redis://...") as client:``; closing stops every reply reader and the
    connection pool.
    """

    def __init__(
        self,
        connection: RedisConnection | str = "redis://localhost:6379/0",
        *,
        stream: str = wire.DEFAULT_STREAM,
        partitions: int = 1,
        reply_prefix: str = wire.DEFAULT_REPLY_PREFIX,
        stream_maxlen: int | None = None,
        max_message_bytes: int | None = None,
        block_ms: int = DEFAULT_BLOCK_MS,
        read_interval_ms: int = DEFAULT_READ_INTERVAL_MS,
        max_readers: int = 1000,
        cancel_ttl_seconds: int = wire.DEFAULT_CANCEL_TTL_SECONDS,
        tracing: bool | None = None,
    ) -> None:
        """``stream_maxlen`` trims the input stream (MAXLEN ~) on every send; leave it unset unless
        producers may outrun the workers for long, since trimming drops unprocessed requests.
        ``max_message_bytes`` rejects oversized messages before sending (the worker would
        dead-letter them). ``max_readers`` bounds the connections kept for blocking reads of reply
        streams (on one server a few are used however many users wait; on a cluster, a few per hash
        slot with users waiting). ``read_interval_ms``: the least time between two reads of the same
        reply streams, for a deployment whose Redis primary is the limit: set to the workers'
        ``chunk_flush_ms``, one read collects a whole flush under load (Redis does less per chunk)
        and a chunk may arrive up to this much later; 0 (the default) reads again at once.
        ``partitions`` must match the queue's: each user's requests go to partition
        ``wire.partition_of(user_id, partitions)``. A ``RedisConnection`` with ``cluster=True`` reaches a
        Redis Cluster (replies are read from each user's stream wherever it lives).
        ``cancel_ttl_seconds``: how long a cancel is remembered for a request still queued (see
        ``cancel``). ``tracing``: a ``streamqueue send`` span per request, its context written
        into the entry (``streamqueue.tracing``); None: on when the ``OTEL_*`` variables ask for it."""
        if isinstance(connection, str):  # a URL alone; nothing is read from the environment
            connection = RedisConnection(url=connection)
        self.stream = stream
        self.partitions = partitions
        self.reply_prefix = reply_prefix
        self.stream_maxlen = stream_maxlen
        self.max_message_bytes = max_message_bytes if max_message_bytes is not None else sys.maxsize
        self.block_ms = block_ms
        self.cancel_ttl_seconds = cancel_ttl_seconds
        self.redis: RedisClient = connect_any(connection, block_ms=block_ms)
        if isinstance(self.redis, aioredis.Redis):  # a cluster client has a pool per node
            self.redis.connection_pool.max_connections = max_readers + _COMMAND_CONNECTIONS
        self.commands = asyncio.Semaphore(_COMMAND_CONNECTIONS)
        self._readers = ReplyReaders(self.redis, self.commands, block_ms, read_interval_ms)
        self._sends = BatchedSends(self.redis, self.commands, stream_maxlen)
        self._tracer = traces.tracer(tracing, "streamqueue-client")

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def reader_count(self) -> int:
        """Users whose reply stream is being read now (all read by a few blocking reads together)."""
        return len(self._readers)

    def awaited_requests(self, user_id: str) -> set[str]:
        """The request ids ``request`` calls are waiting on for ``user_id``."""
        reader = self._readers.get(wire.reply_stream(self.reply_prefix, user_id))
        return set(reader.waiters) if reader is not None else set()

    async def listening(self, user_id: str) -> bool:
        """Wait until ``user_id``'s reply stream is read from a known position: every reply written
        from then on is delivered. False when nobody waits for that user or the reader failed."""
        reader = self._readers.get(wire.reply_stream(self.reply_prefix, user_id))
        if reader is None:
            return False
        await reader.ready.wait()
        return reader.error is None

    async def close(self) -> None:
        """Stop the reply readers (pending requests fail with ``RuntimeError``) and disconnect."""
        await self._readers.close(RuntimeError("the streamqueue client was closed"))
        await self._sends.finish()
        await self.redis.aclose()

    async def send(
        self,
        user_id: str,
        message: str,
        request_id: str | None = None,
        *,
        deadline: float | datetime | None = None,
        chat: Mapping[str, Any] | None = None,
    ) -> str:
        """Append one request to the user's partition of the input stream (the article's plain XADD;
        with one partition, the input stream itself) and return its entry id.

        ``deadline``: seconds from now, or an aware ``datetime``, after which the request is not
        worth answering: a worker that reads it later answers ``expired`` instead of running it
        (written as the ``deadline`` field, Unix time in ms). ``chat``: an OpenAI chat request
        (``messages`` and sampling parameters), written as the ``chat`` field (JSON) for the model
        handler; ``message`` should then be the last user message's text, for other handlers."""
        self._check(user_id, message)
        fields: dict[FieldT, EncodableT] = {
            wire.USER_ID: user_id,
            wire.MESSAGE: message,
            wire.TIMESTAMP: repr(time.time()),
        }
        if request_id is not None:
            fields[wire.REQUEST_ID] = request_id
        if deadline is not None:
            fields[wire.DEADLINE] = str(_deadline_ms(deadline))
        if chat is not None:
            fields[wire.CHAT] = self._chat_field(chat)
        key = wire.partition_stream(self.stream, wire.partition_of(user_id, self.partitions), self.partitions)
        if self._tracer is None:
            return await self._sends.add(key, fields)
        return await self._traced_send(key, fields)

    async def _traced_send(self, key: str, fields: dict[FieldT, EncodableT]) -> str:
        """``send``'s XADD under a PRODUCER span whose context the entry carries."""
        from opentelemetry.trace import SpanKind

        assert self._tracer is not None
        attributes = {"messaging.system": "redis", "messaging.destination.name": key}
        with self._tracer.start_as_current_span(
            "streamqueue send", kind=SpanKind.PRODUCER, attributes=attributes
        ) as span:
            traces.inject(span, fields)
            entry_id = await self._sends.add(key, fields)
            span.set_attribute("messaging.message.id", entry_id)
            return entry_id

    async def cancel(self, user_id: str, request_id: str) -> None:
        """Cancel a request: a queued one is skipped, a running one has its handler cancelled (its
        chunks stop); either way its final entry is a ``cancelled`` reply (``Reply.cancelled``;
        ``request`` and ``request_stream`` raise ``RequestCancelled``). A request already answered,
        or unknown, is left alone: nothing is written to the reply stream.

        Wire form (docs/ai.md, "Cancel"): ``ZADD <stream>:cancelled <now ms> <user_id>:<request_id>``,
        ``ZREMRANGEBYSCORE <stream>:cancelled -inf <now ms - TTL>``, ``PEXPIRE <stream>:cancelled
        <TTL>``, then ``PUBLISH <stream>:cancel <user_id>:<request_id>``. Returns once Redis has both;
        the worker holding the request learns of it from the PUBLISH.
        """
        self._check(user_id, "")
        if not request_id:
            raise ValueError("cancel needs the request_id of the request")
        member = wire.cancel_member(user_id, request_id)
        key = wire.cancel_key(self.stream)
        ttl_ms = self.cancel_ttl_seconds * 1000
        now_ms = int(time.time() * 1000)
        async with self.commands:
            pipe = self.redis.pipeline(transaction=False)  # one key: one slot on a cluster too
            pipe.zadd(key, {member: now_ms})
            pipe.zremrangebyscore(key, "-inf", now_ms - ttl_ms)
            pipe.pexpire(key, ttl_ms)
            await pipe.execute()
            # After the ZADD: a worker that checks the set after missing this message still sees it.
            await self.redis.publish(wire.cancel_channel(self.stream), member)

    async def request(
        self,
        user_id: str,
        message: str,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 -- a per-request deadline is the API callers expect
        request_id: str | None = None,
        deadline: float | datetime | None = None,
        chat: Mapping[str, Any] | None = None,
    ) -> Reply:
        """Send a request and return its final reply; raises ``ReplyError`` on an error reply
        (``RequestExpired`` when its ``deadline``, see ``send``, or the queue's maxQueueAgeSeconds
        passed before a worker ran it) and ``TimeoutError`` when no reply arrives within ``timeout``
        seconds. ``chat``: as for ``send``."""
        request_id = request_id or uuid.uuid4().hex
        reader, waiter = self._expect(user_id, request_id, chunks=False)
        try:
            async with asyncio.timeout(timeout):
                await self._send_when_ready(reader, user_id, message, request_id, deadline, chat)
                return _final(await waiter.queue.get())
        finally:
            reader.waiters.pop(request_id, None)

    def request_stream(
        self,
        user_id: str,
        message: str,
        *,
        timeout: float = 30.0,
        request_id: str | None = None,
        after: str | None = None,
        deadline: float | datetime | None = None,
        chat: Mapping[str, Any] | None = None,
        send_after: Awaitable[object] | None = None,
    ) -> ReplyStream:
        """Send a request and yield its reply chunks in order, ending with the final reply; once they
        are read, the returned stream's ``final`` is the final entry (e.g. its ``usage``).

        Each chunk is a ``Chunk``: a ``str`` with the ``entry_id`` it was read from. ``timeout`` bounds
        the wait for each next chunk, not the whole answer. A handler that does not stream yields its
        whole response as one chunk. Text repeated by a redelivered request is skipped by its offset
        in the reply (by sequence number from workers writing chunk entry format 1). ``deadline``: as
        for ``send``; an expired request raises ``RequestExpired``.

        Resume: with ``after`` (the ``entry_id`` of the last chunk seen, or ``"0-0"`` for "from the
        start"), the request, sent earlier with this ``request_id``, is NOT sent again (``message`` and
        ``deadline`` are ignored); the chunks that follow ``after`` are yielded, each exactly once and
        in order, whether they were written while nobody listened or are still to come. Nothing is
        yielded when ``after`` is the final entry. ``after`` may also be an entry written before the
        request was sent (another request's, e.g. the stream's newest entry taken before sending):
        the reply is then yielded from its start, reading only what follows. Chunks trimmed from the
        reply stream (``reply_maxlen``) or expired with it (``reply_ttl_seconds``) cannot be resumed.
        ``chat``: as for ``send`` (ignored when resuming). ``send_after``: the request is sent only
        once this (e.g. a task deciding whether it may be sent) completes, and not at all if it
        raises (the stream raises that); meanwhile the reply stream's reader takes its position, so
        the two waits overlap instead of adding up.
        """
        if after is not None and request_id is None:
            raise ValueError("resuming (after=...) needs the request_id of the request being resumed")
        stream = ReplyStream()
        request = (user_id, message, request_id or uuid.uuid4().hex, deadline, chat)
        stream.chunks = self._stream(stream, request, timeout, after, send_after)
        return stream

    async def _stream(
        self,
        into: ReplyStream,
        request: tuple[str, str, str, float | datetime | None, Mapping[str, Any] | None],
        timeout: float,  # noqa: ASYNC109 -- request_stream's per-chunk timeout
        after: str | None,
        send_after: Awaitable[object] | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """``request_stream``'s chunks; the final entry is left in ``into.final``."""
        user_id, message, request_id, deadline, chat = request
        reader, waiter = self._expect(user_id, request_id, chunks=True)
        try:
            # Resuming behind an entry that is gone (trimmed), where the reply goes on is unknown:
            # the first chunk that comes sets it.
            order = ReplyOrder(from_start=after in (None, "0", "0-0"))
            backlog: list[Reply] = []
            async with asyncio.timeout(timeout):
                if after is None:
                    send = (user_id, message, request_id, deadline, chat)
                    await self._send_when_ready(reader, *send, send_after=send_after)
                else:
                    await self._ready(reader)
                    last, backlog = await self._since(reader.key, after)
                    backlog = [r for r in backlog if r.request_id == request_id]
                    if last is not None and last.request_id == request_id:
                        if not last.is_chunk:
                            return  # the final entry was seen already
                        order = ReplyOrder.after(last)
                    elif last is not None:  # written before the request was: its reply from the start
                        order = ReplyOrder(from_start=True)
            seen = backlog[-1].entry_id if backlog else after
            pending = iter(backlog)
            while True:
                caught_up = next(pending, None)
                if caught_up is not None:
                    reply = _final(caught_up)
                else:
                    reply = _final(await _next(waiter.queue, timeout))
                    if seen is not None and wire.parse_entry_id(reply.entry_id) <= wire.parse_entry_id(seen):
                        continue  # already read by the catch-up above
                if not reply.is_chunk:
                    into.final = reply
                    if order.final_is_whole:
                        yield Chunk(reply.response or "", reply.entry_id)
                    return
                for chunk in order.add(reply):
                    yield chunk
        finally:
            reader.waiters.pop(request_id, None)

    async def responses(self, user_id: str, *, after: str | None = None) -> AsyncIterator[Reply]:
        """Yield every entry (chunks, final and error replies) that arrives on the user's reply stream
        from about now on, whoever sent the request; runs until the caller stops iterating.

        Resume: with ``after`` (the ``entry_id`` of the last entry seen, ``"0-0"`` for the whole stream),
        yield every entry after it first (those written while the caller was away), then the new ones,
        each exactly once and in order.
        """
        self._check(user_id, "")
        reader = self._reader_for(user_id)
        queue: asyncio.Queue[Reply | BaseException] = asyncio.Queue()
        reader.subscribers.add(queue)  # before the catch-up read: nothing falls between the two
        try:
            await self._ready(reader)
            seen = after
            if after is not None:
                _, backlog = await self._since(reader.key, after)
                for reply in backlog:
                    yield reply
                    seen = reply.entry_id
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if seen is not None and wire.parse_entry_id(item.entry_id) <= wire.parse_entry_id(seen):
                    continue
                yield item
        finally:
            reader.subscribers.discard(queue)

    async def _ready(self, reader: UserReader) -> None:
        await reader.ready.wait()
        if reader.error is not None:
            raise reader.error

    async def _since(self, key: str, after: str) -> tuple[Reply | None, list[Reply]]:
        """The entry ``after`` itself (None if gone or ``0-0``) and every entry after it, oldest first."""
        wire.parse_entry_id(after)  # a malformed id fails here, not as a Redis error
        async with self.commands:
            own: Any = await self.redis.xrange(key, min=after, max=after, count=1)
        replies: list[Reply] = []
        cursor = "(" + after
        while True:
            async with self.commands:
                page: Any = await self.redis.xrange(key, min=cursor, max="+", count=_CATCH_UP_PAGE)
            replies += [Reply(entry_id, fields or {}) for entry_id, fields in page]
            if len(page) < _CATCH_UP_PAGE:
                break
            cursor = "(" + str(page[-1][0])
        first = Reply(str(own[0][0]), own[0][1] or {}) if own else None
        return first, replies

    def _expect(self, user_id: str, request_id: str, *, chunks: bool) -> tuple[UserReader, Waiter]:
        """Register the waiter synchronously, before any await, so the reader cannot retire meanwhile."""
        self._check(user_id, "")
        reader = self._reader_for(user_id)
        if request_id in reader.waiters:
            raise ValueError(f"request_id {request_id!r} is already awaited for user {user_id!r}")
        waiter = Waiter(chunks=chunks)
        reader.waiters[request_id] = waiter
        return reader, waiter

    async def _send_when_ready(
        self,
        reader: UserReader,
        user_id: str,
        message: str,
        request_id: str,
        deadline: float | datetime | None,
        chat: Mapping[str, Any] | None = None,
        *,
        send_after: Awaitable[object] | None = None,
    ) -> None:
        """Send only once the reader's cursor predates the request, so its reply cannot be missed (and
        once ``send_after`` is done)."""
        await self._ready(reader)
        if send_after is not None:
            await send_after
        await self.send(user_id, message, request_id, deadline=deadline, chat=chat)

    def _chat_field(self, chat: Mapping[str, Any]) -> str:
        """``chat`` as the entry's JSON, refused here if the worker would dead-letter it."""
        text = json.dumps(chat, separators=(",", ":"), ensure_ascii=False)
        rejection = wire.chat_object_rejection(chat) or wire.chat_size_rejection(text, self.max_message_bytes)
        if rejection is not None:
            raise ValueError(f"{rejection.reason}: {rejection.detail}")
        return text

    def _reader_for(self, user_id: str) -> UserReader:
        return self._readers.reader_for(wire.reply_stream(self.reply_prefix, user_id))

    def _check(self, user_id: str, message: str) -> None:
        """Refuse what the worker would dead-letter, so the caller gets an error instead of a timeout."""
        rejection = wire.validate_request(
            {wire.USER_ID: user_id, wire.MESSAGE: message}, max_message_bytes=self.max_message_bytes
        )
        if rejection is not None:
            raise ValueError(f"{rejection.reason}: {rejection.detail}")


async def _next(queue: asyncio.Queue[Reply | BaseException], wait_s: float) -> Reply | BaseException:
    """The next item of ``queue``; a read delivers many chunks at once, and those need no timer."""
    if not queue.empty():
        return queue.get_nowait()
    async with asyncio.timeout(wait_s):
        return await queue.get()


def _deadline_ms(deadline: float | datetime) -> int:
    """``deadline`` (seconds from now, or an aware datetime) as the wire's Unix time in ms."""
    if isinstance(deadline, datetime):
        if deadline.tzinfo is None:
            raise ValueError("a deadline datetime must be timezone-aware")
        return int(deadline.timestamp() * 1000)
    if not deadline > 0:
        raise ValueError(f"deadline must be a number of seconds from now above 0, not {deadline}")
    return int((time.time() + deadline) * 1000)


def _final(item: Reply | BaseException) -> Reply:
    """Turn what a waiter received into the reply, raising reader failures and error replies."""
    if isinstance(item, BaseException):
        raise item
    if item.error is not None:
        raise ReplyError(item)
    if item.cancelled:
        raise RequestCancelled(item)
    if item.expired is not None:
        raise RequestExpired(item)
    return item
