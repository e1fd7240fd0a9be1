"""The multiplexed reply reader: every user reply stream a client awaits is read by a few blocking
XREADs (one group of streams per hash slot on a cluster), and each entry goes to whoever waits for it.

A user's replies all land on one stream (``ai_to_user:<user_id>``), so many concurrent requests for the
same user share it. Rather than one blocking read per request (which would cost a connection each and
race with each other), the client keeps one reader per user reply stream (its cursor and its waiters)
and hands each entry to whoever waits for its ``request_id``. The reader's cursor is taken before the
first request is sent, so a reply that arrives before the first read is still seen. The readers are
read together: one blocking XREAD covers every user's stream (on a cluster, every stream of one hash
slot), so 1,000 users streaming replies cost a few connections and one command per wake-up, not a
connection and a command per chunk each.

The reads can be paced (``read_interval_ms``, off by default): a group's next read goes no sooner
than that after its last one. An XREAD of many streams costs Redis in proportion to the streams it
names (a blocking registration on each) and to the streams with news; unpaced, every worker flush
costs two such reads (on Redis 7.0 a blocked XREAD returns only the stream that woke it, so a second
read collects the rest) and a blocking registration on every stream. Paced at the workers' flush
window, one read collects a whole flush, mostly without blocking. A chunk may wait up to the interval
longer (more at p99 on a loaded machine, whose timers fire late); a client whose reads block longer
than the interval anyway is never held back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import ResponseError
from redis.typing import KeyT, StreamIdT

from ..connection import CONNECTION_ERRORS, RedisClient, retry_transient
from ..wire import parse_entry_id
from .replies import Reply

log = logging.getLogger(__name__)

# What an XREAD returns: each stream's key and its entries (id and fields).
_Entries = list[tuple[str, list[tuple[str, dict[str, str]]]]]
# Entries per stream and XREAD: a reader far behind catches up in a few reads.
_READ_COUNT = 1000
# Blocking reads in flight at once for one group of reply streams (each holds a connection): a read
# is superseded by the next one, which covers its streams, and ends when it returns.
_MAX_READS = 4


def _connection_lost(exc: BaseException) -> bool:
    return isinstance(exc, CONNECTION_ERRORS)


def _lost_redis(exc: Exception, delay: float) -> None:
    log.warning("reply reader lost Redis (%s); retrying in %.2fs", exc, delay)


@dataclass
class Waiter:
    """A request awaiting entries with its request_id; ``chunks`` waiters also receive chunk entries."""

    chunks: bool
    queue: asyncio.Queue[Reply | BaseException] = field(default_factory=asyncio.Queue)


class UserReader:
    """One user's reply stream as this client reads it: its cursor and whoever waits on its entries."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.waiters: dict[str, Waiter] = {}
        self.subscribers: set[asyncio.Queue[Reply | BaseException]] = set()
        self.ready = asyncio.Event()  # set once the cursor is known, or the reader has failed
        self.error: Exception | None = None
        self.cursor = "0-0"
        self.idle_since: float | None = None

    def idle(self) -> bool:
        return not self.waiters and not self.subscribers

    def deliver(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        """Hand on the entries after the cursor; earlier ones came already (through another read)."""
        cursor = parse_entry_id(self.cursor)
        for entry_id, fields in entries:
            if parse_entry_id(entry_id) <= cursor:
                continue
            self.cursor = entry_id
            cursor = parse_entry_id(entry_id)
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


class _GroupReads:
    """Reads many users' reply streams with one blocking XREAD, each stream from its own cursor.

    On one server every stream of the client is in one such group; on a cluster, where one command
    reaches one hash slot, the streams of each slot are. A reader that joins while a read blocks cannot
    be added to it, so a new read starts, for every stream of the group, as soon as one pipelined
    XREVRANGE has taken the newcomers' positions. Whenever a read returns, its loop reads again unless
    a newer read already covers every stream, in which case it ends: the reads in flight shrink back
    to one. Two reads covering one stream for a while cost nothing but the wake-up: entries at or
    before a stream's cursor are dropped. A reader retires once it has served nobody for ``block_ms``.
    """

    def __init__(self, owner: ReplyReaders) -> None:
        self._owner = owner
        self.readers: dict[str, UserReader] = {}  # position taken: read from their cursors
        self._joining: list[UserReader] = []
        self._members = 0  # counts the readers that joined: a read taken at this count covers all
        self._reads = 0  # numbers the reads
        # read number -> (``_members`` when it was sent, its loop)
        self._in_flight: dict[int, tuple[int, asyncio.Task[Any] | None]] = {}
        self._swept = 0.0
        self._last_read = 0.0  # when the newest read was sent (monotonic)
        self.tasks: set[asyncio.Task[None]] = set()

    def join(self, reader: UserReader) -> None:
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
            while self.readers:
                read = await retry_transient(self._read_once, _lost_redis, retryable=_connection_lost)
                if read is None:
                    return
                number, entries = read
                for key, stream_entries in entries:
                    reader = self.readers.get(key)
                    if reader is not None:
                        reader.deliver(stream_entries)
                await self._pace()
                # No await from here to the next read: a request that registered itself with a
                # reader still in ``readers`` is served by that read.
                self._sweep(now=time.monotonic())
                if self._covered_after(number):
                    return
        except Exception as exc:
            log.error("reply reader failed: %s", exc)
            for reader in [*joining, *self.readers.values()]:
                self._retire(reader, exc)

    async def _read_once(self) -> tuple[int, _Entries] | None:
        """One read of every stream, and its number; None once a later read covers them (or none is
        left), so that this loop can end."""
        if not self.readers:
            return None
        number = self._reads = self._reads + 1
        self._last_read = time.monotonic()
        self._supersede()
        self._in_flight[number] = (self._members, asyncio.current_task())
        try:
            return number, await self._read()
        except CONNECTION_ERRORS:
            self._sweep(now=None)  # nobody waits on an idle reader: let it go at once
            if self._covered_after(number):
                return None
            raise
        finally:
            self._in_flight.pop(number, None)

    async def _pace(self) -> None:
        """Wait out the rest of ``read_interval_s`` since the last read was sent (see the module doc)."""
        wait = self._last_read + self._owner.read_interval_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

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

    async def _take_positions(self, joining: list[UserReader]) -> bool:
        """Start after the newest entry already there, so old replies are not re-delivered; False if
        no reader could join (each failed with the reason)."""
        pipe = self._owner.redis.pipeline(transaction=False)
        for reader in joining:
            pipe.xrevrange(reader.key, count=1)
        try:
            async with self._owner.commands:
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

    async def _read(self) -> _Entries:
        """One blocking XREAD of every stream; if Redis refuses it, the streams one by one, so that only
        a stream it refuses (a key of another type) fails its reader."""
        readers = list(self.readers.values())
        cursors: dict[KeyT, StreamIdT] = {reader.key: reader.cursor for reader in readers}
        redis = self._owner.redis
        try:
            result: Any = await redis.xread(cursors, block=self._owner.block_ms, count=_READ_COUNT)
            return result or []
        except ResponseError:
            pass
        pipe = redis.pipeline(transaction=False)
        for reader in readers:
            pipe.xread({reader.key: reader.cursor}, count=_READ_COUNT)
        results = await pipe.execute(raise_on_error=False)
        found: _Entries = []
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
        block_s = self._owner.block_ms / 1000
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

    def _retire(self, reader: UserReader, error: Exception | None) -> None:
        if error is not None:
            reader.fail(error)
        if self.readers.get(reader.key) is reader:
            del self.readers[reader.key]
        self._owner.forget(reader)


class ReplyReaders:
    """The user reply streams one client reads, by key, each group of them read together.

    ``commands`` is the client's semaphore for non-blocking commands (taking positions counts as
    one); the blocking reads hold connections of their own (``_MAX_READS`` per group at most).
    """

    def __init__(
        self, redis: RedisClient, commands: asyncio.Semaphore, block_ms: int, read_interval_ms: int = 0
    ) -> None:
        self.redis = redis
        self.commands = commands
        self.block_ms = block_ms
        self.read_interval_s = read_interval_ms / 1000
        self._readers: dict[str, UserReader] = {}
        self._groups: dict[int | None, _GroupReads] = {}  # by hash slot on a cluster, else one

    def __len__(self) -> int:
        return len(self._readers)

    def get(self, key: str) -> UserReader | None:
        """The reader of stream ``key`` if somebody waits on it now."""
        return self._readers.get(key)

    def reader_for(self, key: str) -> UserReader:
        """The reader of stream ``key``, started (joining its group's reads) if there is none."""
        reader = self._readers.get(key)
        if reader is None:
            reader = self._readers[key] = UserReader(key)
            slot = key_slot(key.encode()) if isinstance(self.redis, aioredis.RedisCluster) else None
            group = self._groups.get(slot)
            if group is None:
                group = self._groups[slot] = _GroupReads(self)
            group.join(reader)
        return reader

    def forget(self, reader: UserReader) -> None:
        """Drop a retired reader; the next request for its user starts a new one."""
        if self._readers.get(reader.key) is reader:
            del self._readers[reader.key]

    async def close(self, exc: Exception) -> None:
        """Fail every reader with ``exc`` and wait for the reads to end."""
        tasks = [task for group in self._groups.values() for task in group.tasks]
        for group in self._groups.values():
            group.close(exc)
        # gather, not ``await task``: a close() that is itself cancelled ends with that cancellation
        # (a suppressed CancelledError of the awaited task would have swallowed it).
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                raise result
        self._readers.clear()
