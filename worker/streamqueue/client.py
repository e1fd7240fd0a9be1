"""``streamqueue.Client``: send requests into the input stream and await their replies.

A user's replies all land on one stream (``ai_to_user:<user_id>``), so many concurrent requests for the
same user share it. Rather than one blocking read per request (which would cost a connection each and
race with each other), the client keeps one reader per user reply stream (its cursor and its waiters)
and hands each entry to whoever waits for its ``request_id``. The reader's cursor is taken before the
first request is sent, so a reply that arrives before the first read is still seen. The readers are
read together: one blocking XREAD covers every user's stream (on a cluster, every stream of one hash
slot), so 1,000 users streaming replies cost a few connections and one command per wake-up, not a
connection and a command per chunk each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT, KeyT, StreamIdT

from . import wire
from .connection import CONNECTION_ERRORS, Backoff, RedisClient, RedisConnection, connect_any

log = logging.getLogger(__name__)

# How long one reader XREAD blocks; an idle reader notices it has nobody to serve after at most this.
DEFAULT_BLOCK_MS = 2000
# Non-blocking commands (XADD, XREVRANGE) share this many connections however many requests run at
# once; the blocking reads of reply streams hold a few more (see ``_ReplyReads``).
_COMMAND_CONNECTIONS = 32
_RECONNECT_BACKOFF_MAX_S = 2.0
# Entries per stream and XREAD: a reader far behind catches up in a few reads.
_READ_COUNT = 1000
# Blocking reads in flight at once for one group of reply streams (each holds a connection): a read
# is superseded by the next one, which covers its streams, and ends when it returns.
_MAX_READS = 4
# Entries per XRANGE when a resuming reader catches up with what it missed.
_CATCH_UP_PAGE = 500


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
    def worker_id(self) -> str | None:
        return self.fields.get(wire.WORKER_ID)

    @property
    def chunk(self) -> str | None:
        return self.fields.get(wire.CHUNK)

    @property
    def seq(self) -> int | None:
        raw = self.fields.get(wire.SEQ)
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


def entry_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable pair: ``"1700000000000-3"`` -> ``(1700000000000, 3)``."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


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


@dataclass
class _Waiter:
    """A request awaiting entries with its request_id; ``chunks`` waiters also receive chunk entries."""

    chunks: bool
    queue: asyncio.Queue[Reply | BaseException] = field(default_factory=asyncio.Queue)


class _UserReader:
    """One user's reply stream as this client reads it: its cursor and whoever waits on its entries."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.waiters: dict[str, _Waiter] = {}
        self.subscribers: set[asyncio.Queue[Reply | BaseException]] = set()
        self.ready = asyncio.Event()  # set once the cursor is known, or the reader has failed
        self.error: Exception | None = None
        self.cursor = "0-0"
        self.idle_since: float | None = None

    def idle(self) -> bool:
        return not self.waiters and not self.subscribers

    def deliver(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        """Hand on the entries after the cursor; earlier ones came already (through another read)."""
        cursor = entry_key(self.cursor)
        for entry_id, fields in entries:
            if entry_key(entry_id) <= cursor:
                continue
            self.cursor = entry_id
            cursor = entry_key(entry_id)
            self._dispatch(Reply(entry_id, fields or {}))

    def _dispatch(self, reply: Reply) -> None:
        for queue in self.subscribers:
            queue.put_nowait(reply)
        request_id = reply.request_id
        if request_id is None:
            return
        waiter = self.waiters.get(request_id)
        if waiter is None or (reply.is_chunk and not waiter.chunks):
            return
        if not reply.is_chunk:
            # A redelivered request can be answered twice; only the first final reply is awaited.
            del self.waiters[request_id]
        waiter.queue.put_nowait(reply)

    def fail(self, exc: Exception) -> None:
        """Wake everyone waiting on this reader with ``exc``; it will not read again."""
        self.error = exc
        self.ready.set()
        for waiter in self.waiters.values():
            waiter.queue.put_nowait(exc)
        self.waiters.clear()
        for queue in self.subscribers:
            queue.put_nowait(exc)


class _ReplyReads:
    """Reads many users' reply streams with one blocking XREAD, each stream from its own cursor.

    On one server every stream of the client is in one such group; on a cluster, where one command
    reaches one hash slot, the streams of each slot are. A reader that joins while a read blocks cannot
    be added to it, so a new read starts, for every stream of the group, as soon as one pipelined
    XREVRANGE has taken the newcomers' positions. Whenever a read returns, its loop reads again unless
    a newer read already covers every stream, in which case it ends: the reads in flight shrink back
    to one. Two reads covering one stream for a while cost nothing but the wake-up: entries at or
    before a stream's cursor are dropped. A reader retires once it has served nobody for ``block_ms``.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self.readers: dict[str, _UserReader] = {}  # position taken: read from their cursors
        self._joining: list[_UserReader] = []
        self._members = 0  # counts the readers that joined: a read taken at this count covers all
        self._reads = 0  # numbers the reads
        # read number -> (``_members`` when it was sent, its loop)
        self._in_flight: dict[int, tuple[int, asyncio.Task[Any] | None]] = {}
        self._swept = 0.0
        self.tasks: set[asyncio.Task[None]] = set()

    def join(self, reader: _UserReader) -> None:
        """Start reading ``reader``'s stream; its ``ready`` is set once its position is taken."""
        self._joining.append(reader)
        if len(self._joining) == 1:  # the ones that join in the same loop turn go together
            task = asyncio.create_task(self._loop(), name="streamqueue-reply-reader")
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def close(self, exc: Exception) -> None:
        for reader in [*self.readers.values(), *self._joining]:
            reader.fail(exc)
        for task in self.tasks:
            task.cancel()

    async def _loop(self) -> None:
        joining, self._joining = self._joining, []
        try:
            if not await self._take_positions(joining):
                return
            backoff = Backoff(cap=_RECONNECT_BACKOFF_MAX_S)
            while self.readers:
                number = self._reads = self._reads + 1
                self._supersede()
                self._in_flight[number] = (self._members, asyncio.current_task())
                try:
                    entries = await self._read()
                except CONNECTION_ERRORS as exc:
                    self._in_flight.pop(number, None)
                    self._sweep(now=None)  # nobody waits on an idle reader: let it go at once
                    if self._covered_after(number):
                        return
                    delay = backoff.next_delay()
                    log.warning("reply reader lost Redis (%s); retrying in %.2fs", exc, delay)
                    await asyncio.sleep(delay)
                    continue
                except BaseException:
                    self._in_flight.pop(number, None)
                    raise
                self._in_flight.pop(number, None)
                backoff.reset()
                for key, stream_entries in entries:
                    reader = self.readers.get(key)
                    if reader is not None:
                        reader.deliver(stream_entries)
                # No await from here to the next read: a request that registered itself with a
                # reader still in ``readers`` is served by that read.
                self._sweep(now=time.monotonic())
                if self._covered_after(number):
                    return
        except Exception as exc:
            log.error("reply reader failed: %s", exc)
            for reader in [*joining, *self.readers.values()]:
                self._retire(reader, exc)

    def _covered_after(self, number: int) -> bool:
        """Whether a read sent after read ``number`` covers every stream (or none is left)."""
        if not self.readers:
            return True
        return any(
            later > number and members == self._members for later, (members, _) in self._in_flight.items()
        )

    def _supersede(self) -> None:
        """Before a read of every stream: cut the oldest read in flight if too many are (each holds a
        connection while it blocks, and the new read covers its streams)."""
        if len(self._in_flight) >= _MAX_READS:
            _, task = self._in_flight.pop(min(self._in_flight))
            if task is not None:
                task.cancel()

    async def _take_positions(self, joining: list[_UserReader]) -> bool:
        """Start after the newest entry already there, so old replies are not re-delivered; False if
        no reader could join (each failed with the reason)."""
        pipe = self._client.redis.pipeline(transaction=False)
        for reader in joining:
            pipe.xrevrange(reader.key, count=1)
        try:
            async with self._client.commands:
                results = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            log.error("reply readers for %d users failed: %s", len(joining), exc)
            results = [exc] * len(joining)
        joined = False
        for reader, last in zip(joining, results, strict=True):
            if isinstance(last, Exception):
                self._retire(reader, last)
                continue
            if last:
                reader.cursor = str(last[0][0])
            self.readers[reader.key] = reader
            self._members += 1
            reader.ready.set()
            joined = True
        return joined

    async def _read(self) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
        """One blocking XREAD of every stream; if Redis refuses it, the streams one by one, so that only
        a stream it refuses (a key of another type) fails its reader."""
        readers = list(self.readers.values())
        cursors: dict[KeyT, StreamIdT] = {reader.key: reader.cursor for reader in readers}
        redis = self._client.redis
        try:
            result: Any = await redis.xread(cursors, block=self._client.block_ms, count=_READ_COUNT)
            return result or []
        except ResponseError:
            pass
        pipe = redis.pipeline(transaction=False)
        for reader in readers:
            pipe.xread({reader.key: reader.cursor}, count=_READ_COUNT)
        results = await pipe.execute(raise_on_error=False)
        found: list[tuple[str, list[tuple[str, dict[str, str]]]]] = []
        for reader, one in zip(readers, results, strict=True):
            if isinstance(one, ResponseError):
                log.error("reply reader for %s failed: %s", reader.key, one)
                self._retire(reader, one)
            elif isinstance(one, Exception):
                raise one
            else:
                found += one or []
        return found

    def _sweep(self, now: float | None) -> None:
        """Retire the readers idle for ``block_ms`` (``now`` None: every idle reader), a few times per
        ``block_ms`` at most."""
        block_s = self._client.block_ms / 1000
        if now is not None and now - self._swept < block_s / 4:
            return
        for reader in list(self.readers.values()):
            if not reader.idle():
                reader.idle_since = None
            elif now is None:
                self._retire(reader, None)
            elif reader.idle_since is None:
                reader.idle_since = now
            elif now - reader.idle_since >= block_s:
                self._retire(reader, None)
        if now is not None:
            self._swept = now

    def _retire(self, reader: _UserReader, error: Exception | None) -> None:
        if error is not None:
            reader.fail(error)
        if self.readers.get(reader.key) is reader:
            del self.readers[reader.key]
        self._client._forget_reader(reader)


class _Sends:
    """Requests sent in the same loop turn share one round trip: their XADDs go as one pipeline.

    1,000 requests started at once cost one pipeline instead of 1,000 commands (redis-py spends far
    more time per command than Redis does). Each caller still gets its own entry id, or its own error.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._queue: list[tuple[str, dict[FieldT, EncodableT], asyncio.Future[str]]] = []

    async def add(self, key: str, fields: dict[FieldT, EncodableT]) -> str:
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.append((key, fields, done))
        if len(self._queue) == 1:  # its first step runs after this loop turn's other sends are queued
            task = asyncio.create_task(self._send(), name="streamqueue-send")
            self._client._background.add(task)
            task.add_done_callback(self._client._background.discard)
        return await done

    async def _send(self) -> None:
        batch, self._queue = self._queue, []
        client = self._client
        maxlen, approximate = client.stream_maxlen, client.stream_maxlen is not None
        try:
            async with client.commands:
                if len(batch) == 1:  # alone: a plain command costs less than a pipeline of one
                    key, fields, _ = batch[0]
                    results = [await client.redis.xadd(key, fields, maxlen=maxlen, approximate=approximate)]
                else:
                    pipe = client.redis.pipeline(transaction=False)
                    for key, fields, _ in batch:
                        pipe.xadd(key, fields, maxlen=maxlen, approximate=approximate)
                    results = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        except BaseException:  # cancelled (the client is closing): so are the sends
            for _, _, done in batch:
                done.cancel()
            raise
        for (_, _, done), result in zip(batch, results, strict=True):
            if done.done():  # its caller gave up (cancelled)
                continue
            if isinstance(result, Exception):
                done.set_exception(result)
            else:
                done.set_result(str(result))


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
        max_readers: int = 1000,
        cancel_ttl_seconds: int = wire.DEFAULT_CANCEL_TTL_SECONDS,
    ) -> None:
        """``stream_maxlen`` trims the input stream (MAXLEN ~) on every send; leave it unset unless
        producers may outrun the workers for long, since trimming drops unprocessed requests.
        ``max_message_bytes`` rejects oversized messages before sending (the worker would
        dead-letter them). ``max_readers`` bounds the connections kept for blocking reads of reply
        streams (on one server a few are used however many users wait; on a cluster, a few per hash
        slot with users waiting).
        ``partitions`` must match the queue's: each user's requests go to partition
        ``wire.partition_of(user_id, partitions)``. A ``RedisConnection`` with ``cluster=True`` reaches a
        Redis Cluster (replies are read from each user's stream wherever it lives).
        ``cancel_ttl_seconds``: how long a cancel is remembered for a request still queued (see
        ``cancel``)."""
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
        self._readers: dict[str, _UserReader] = {}
        self._reads: dict[int | None, _ReplyReads] = {}  # by hash slot on a cluster, else one
        self._sends = _Sends(self)
        self._background: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def reader_count(self) -> int:
        """Users whose reply stream is being read now (each holds one connection while it lasts)."""
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
        tasks = [task for reads in self._reads.values() for task in reads.tasks]
        for reads in self._reads.values():
            reads.close(RuntimeError("the streamqueue client was closed"))
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._readers.clear()
        await asyncio.gather(*self._background, return_exceptions=True)  # sends on the wire finish
        await self.redis.aclose()

    async def send(self, user_id: str, message: str, request_id: str | None = None) -> str:
        """Append one request to the user's partition of the input stream (the article's plain XADD;
        with one partition, the input stream itself) and return its entry id."""
        self._check(user_id, message)
        fields: dict[FieldT, EncodableT] = {
            wire.USER_ID: user_id,
            wire.MESSAGE: message,
            wire.TIMESTAMP: repr(time.time()),
        }
        if request_id is not None:
            fields[wire.REQUEST_ID] = request_id
        key = wire.partition_stream(self.stream, wire.partition_of(user_id, self.partitions), self.partitions)
        return await self._sends.add(key, fields)

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
    ) -> Reply:
        """Send a request and return its final reply; raises ``ReplyError`` on an error reply and
        ``TimeoutError`` when no reply arrives within ``timeout`` seconds."""
        request_id = request_id or uuid.uuid4().hex
        reader, waiter = self._expect(user_id, request_id, chunks=False)
        try:
            async with asyncio.timeout(timeout):
                await self._send_when_ready(reader, user_id, message, request_id)
                return _final(await waiter.queue.get())
        finally:
            reader.waiters.pop(request_id, None)

    async def request_stream(
        self,
        user_id: str,
        message: str,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 -- a per-request deadline is the API callers expect
        request_id: str | None = None,
        after: str | None = None,
    ) -> AsyncIterator[Chunk]:
        """Send a request and yield its reply chunks in order, ending with the final reply.

        Each chunk is a ``Chunk``: a ``str`` with the ``entry_id`` it was read from. ``timeout`` bounds
        the wait for each next chunk, not the whole answer. A handler that does not stream yields its
        whole response as one chunk. Chunks repeated by a redelivered request are skipped by sequence
        number.

        Resume: with ``after`` (the ``entry_id`` of the last chunk seen, or ``"0-0"`` for "from the
        start"), the request, sent earlier with this ``request_id``, is NOT sent again (``message`` is
        ignored); the chunks that follow ``after`` are yielded, each exactly once and in order, whether
        they were written while nobody listened or are still to come. Nothing is yielded when
        ``after`` is the final entry. Chunks trimmed from the reply stream (``reply_maxlen``) or expired
        with it (``reply_ttl_seconds``) cannot be resumed.
        """
        if after is not None and request_id is None:
            raise ValueError("resuming (after=...) needs the request_id of the request being resumed")
        request_id = request_id or uuid.uuid4().hex
        reader, waiter = self._expect(user_id, request_id, chunks=True)
        try:
            # Resuming behind an entry that is gone (trimmed), the next sequence number is unknown:
            # the first chunk that comes sets it.
            order: ChunkOrder[Chunk] | None = ChunkOrder() if after in (None, "0", "0-0") else None
            backlog: list[Reply] = []
            async with asyncio.timeout(timeout):
                if after is None:
                    await self._send_when_ready(reader, user_id, message, request_id)
                else:
                    await self._ready(reader)
                    last, backlog = await self._since(reader.key, after)
                    backlog = [r for r in backlog if r.request_id == request_id]
                    if last is not None and last.request_id == request_id:
                        if not last.is_chunk:
                            return  # the final entry was seen already
                        order = ChunkOrder((last.seq or 0) + 1)
            seen = backlog[-1].entry_id if backlog else after
            pending = iter(backlog)
            while True:
                caught_up = next(pending, None)
                if caught_up is not None:
                    reply = _final(caught_up)
                else:
                    reply = _final(await _next(waiter.queue, timeout))
                    if seen is not None and entry_key(reply.entry_id) <= entry_key(seen):
                        continue  # already read by the catch-up above
                if not reply.is_chunk:
                    if order is not None and order.next_seq == 0:
                        yield Chunk(reply.response or "", reply.entry_id)
                    return
                if order is None:
                    order = ChunkOrder(reply.seq or 0)
                for chunk in order.add(reply.seq, Chunk(reply.chunk or "", reply.entry_id)):
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
                if seen is not None and entry_key(item.entry_id) <= entry_key(seen):
                    continue
                yield item
        finally:
            reader.subscribers.discard(queue)

    async def _ready(self, reader: _UserReader) -> None:
        await reader.ready.wait()
        if reader.error is not None:
            raise reader.error

    async def _since(self, key: str, after: str) -> tuple[Reply | None, list[Reply]]:
        """The entry ``after`` itself (None if gone or ``0-0``) and every entry after it, oldest first."""
        entry_key(after)  # a malformed id fails here, not as a Redis error
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

    def _expect(self, user_id: str, request_id: str, *, chunks: bool) -> tuple[_UserReader, _Waiter]:
        """Register the waiter synchronously, before any await, so the reader cannot retire meanwhile."""
        self._check(user_id, "")
        reader = self._reader_for(user_id)
        if request_id in reader.waiters:
            raise ValueError(f"request_id {request_id!r} is already awaited for user {user_id!r}")
        waiter = _Waiter(chunks=chunks)
        reader.waiters[request_id] = waiter
        return reader, waiter

    async def _send_when_ready(
        self, reader: _UserReader, user_id: str, message: str, request_id: str
    ) -> None:
        """Send only once the reader's cursor predates the request, so its reply cannot be missed."""
        await reader.ready.wait()
        if reader.error is not None:
            raise reader.error
        await self.send(user_id, message, request_id)

    def _reader_for(self, user_id: str) -> _UserReader:
        key = wire.reply_stream(self.reply_prefix, user_id)
        reader = self._readers.get(key)
        if reader is None:
            reader = self._readers[key] = _UserReader(key)
            slot = key_slot(key.encode()) if isinstance(self.redis, aioredis.RedisCluster) else None
            reads = self._reads.get(slot)
            if reads is None:
                reads = self._reads[slot] = _ReplyReads(self)
            reads.join(reader)
        return reader

    def _forget_reader(self, reader: _UserReader) -> None:
        if self._readers.get(reader.key) is reader:
            del self._readers[reader.key]

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


def _final(item: Reply | BaseException) -> Reply:
    """Turn what a waiter received into the reply, raising reader failures and error replies."""
    if isinstance(item, BaseException):
        raise item
    if item.error is not None:
        raise ReplyError(item)
    if item.cancelled:
        raise RequestCancelled(item)
    return item
