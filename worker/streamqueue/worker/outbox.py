"""Writes that finish entries — replies, dead letters — committed together with their XACK, and the
streamed chunks that precede replies.

At-least-once hinges on order: an entry is acknowledged only together with, and after, the writes that
answer it. Finished entries queue here and one flusher commits everything queued so far in a single
round trip, so a busy worker pays one RTT for many replies while an idle one pays no delay. Streamed
chunks (``send``, via ``chunks.ChunkWriter``) join the same queue: a flush writes the chunks of every
streaming reply at once, and since one queue is flushed in order by one flusher, a reply stream's
entries land in the order they were queued (a chunk never after the final reply queued behind it,
even a ``cancelled`` one).

The commit is one Lua script call per batch: every XADD, one lifetime step per reply stream and the
XACK run atomically on the server, so a lost connection can no longer leave replies written but
unacknowledged, and the client encodes one command instead of hundreds (redis-py spends far more time
per command than Redis does). If the ACL user may not run scripts (NOPERM), the same commands go as a
pipeline instead.

On a Redis Cluster one script may touch one hash slot only, and a user's reply stream lives in
another slot than the partition: the commit is two steps there. The replies (and their lifetime
steps) are written first, pipelined to their nodes; only once every node has confirmed them is the
batch acknowledged. A crash or failover between the steps leaves the entries pending, so they are
answered again (a duplicate reply with the same ``request_id``), never lost.

The lifetime step decides whether a reply stream may expire. A stream read with plain XREAD is only
ever read from a position its reader keeps, so it can expire after an idle TTL and be recreated by the
next reply. A stream read through a consumer group (the article's user client creates one) must not:
the group lives inside the key, so an expiry would delete it and its reader would get NOGROUP forever.
So a stream with a group gets PERSIST (which also clears a TTL set before the group existed) and one
without gets EXPIRE; ``XINFO GROUPS`` decides, inside the same script, for the streams whose step is
due (``lifetimes``: once per stream per tenth of its TTL, at most a minute, not in every batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError
from redis.typing import EncodableT, FieldT

from ..connection import RedisClient, retry_transient, transient
from ..metrics import WorkerMetrics
from .lifetimes import LifetimeSteps

log = logging.getLogger(__name__)
# Entries per script call: a script blocks Redis while it runs, so one call stays within a few
# milliseconds.
MAX_BATCH = 500
# Script calls per round trip, pipelined on one connection (so they run in order, and other clients'
# commands between them): a backlog, such as the chunks of a thousand streaming replies, goes at once.
CALLS_PER_FLUSH = 8


@dataclass(frozen=True)
class StreamWrite:
    """One XADD; ``maxlen`` trims approximately and ``ttl_s`` (re)sets the key's idle expiry, unless
    the stream is read through a consumer group (then it is made persistent: see the module doc).

    ``count_trimmed``: the entries this XADD's trimming removes are counted in
    ``streamqueue_dead_letters_trimmed_total`` (XLEN before and after; dead letters are rare, so the
    two O(1) calls cost nothing, and nobody loses a dead letter silently)."""

    key: str
    fields: dict[str, str]
    maxlen: int | None = None
    ttl_s: int | None = None
    count_trimmed: bool = False


# Called once per entry with None when its writes and XACK are committed, else with the reason.
Done = Callable[[BaseException | None], None]


@dataclass(frozen=True)
class _Queued:
    entry_id: str | None  # None: writes without an XACK (a streamed chunk)
    writes: list[StreamWrite]
    on_done: Done
    taken: Callable[[], None] | None = None  # told when a flush takes it: its writes are final now


class Outbox:
    """Commits finished entries in batches: their writes, then their XACK."""

    def __init__(
        self,
        redis: RedisClient,
        stream: str,
        group: str,
        metrics: WorkerMetrics,
        *,
        chunk_flush_s: float = 0.0,
    ) -> None:
        """``chunk_flush_s``: how long streamed chunks may wait for others before a flush, unless an
        entry waits to be committed (see ``send``)."""
        self._redis = redis
        self._stream = stream
        self._group = group
        self._metrics = metrics
        self.chunk_flush_s = chunk_flush_s
        self._queue: list[_Queued] = []
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()  # an entry to commit is queued, or a flush's worth of chunks
        self._queued_since = 0.0  # loop time when the queue last went from empty to not empty
        self._lifetimes = LifetimeSteps()
        self._abandon = asyncio.Event()
        self._script = redis.register_script(_COMMIT_LUA)
        self._two_step = isinstance(redis, aioredis.RedisCluster)
        self._use_script = not self._two_step

    def submit(self, entry_id: str, writes: list[StreamWrite], on_done: Done) -> None:
        """Queue ``writes`` and the XACK of ``entry_id``; ``on_done`` reports the outcome.

        ``on_done`` gets ``OutboxAbandoned`` if Redis stayed unreachable until the worker gave up
        (shutdown deadline): the entry then stays pending and another worker reclaims it.
        """
        self._queue.append(_Queued(entry_id, writes, on_done))
        self._wake.set()
        self._urgent.set()

    def send(
        self,
        write: StreamWrite,
        on_done: Done,
        taken: Callable[[], None] | None = None,
        *,
        urgent: bool = False,
    ) -> None:
        """Queue one write that acknowledges nothing (a streamed chunk), in order with everything else.

        ``on_done`` gets None once it is written (a write Redis rejects, such as a reply key of another
        type, is logged and counts as done, as for replies), else why it was not. Until ``taken`` is
        called (when a flush takes the write) the sender may still change the write's fields: that is
        how one reply's chunks that wait together become one entry. Queued chunks wait up to
        ``chunk_flush_s`` for more before they are flushed, so one script call and one wake-up of each
        reader carry many replies' chunks, unless an entry is to be committed (that flush takes them)
        or the write is ``urgent`` (a reply's first chunk: the time to first token stays as it was).
        """
        if not self._queue:
            self._queued_since = asyncio.get_running_loop().time()
        self._queue.append(_Queued(None, [write], on_done, taken))
        self._wake.set()
        if urgent or len(self._queue) >= MAX_BATCH * CALLS_PER_FLUSH:
            self._urgent.set()

    def abandon(self) -> None:
        """Stop retrying: queued and future entries fail with ``OutboxAbandoned``."""
        self._abandon.set()
        self._wake.set()
        self._urgent.set()

    async def run(self) -> None:
        """The flusher: commits whatever is queued, retrying through Redis outages."""
        while True:
            await self._wake.wait()
            await self._hold_chunks()
            self._wake.clear()
            size = MAX_BATCH * CALLS_PER_FLUSH
            batch, self._queue = self._queue[:size], self._queue[size:]
            self._urgent.clear()
            if self._queue:
                self._wake.set()
                if len(self._queue) >= size or any(item.entry_id is not None for item in self._queue):
                    self._urgent.set()
            for item in batch:
                if item.taken is not None:
                    item.taken()
            while batch:
                retry_failed = partial(self._commit_failed, len(batch))
                try:
                    committed = await retry_transient(
                        partial(self._commit, batch), retry_failed, stop=self._abandon
                    )
                except Exception as exc:
                    log.exception("reply/ack commit rejected by Redis")
                    _report(batch, exc)
                    break
                if committed is None:  # abandoned
                    _report(batch, OutboxAbandoned("Redis unreachable at shutdown; entry left pending"))
                    break
                _report(batch[:committed], None)
                batch = batch[committed:]

    async def _hold_chunks(self) -> None:
        """Let streamed chunks gather until the oldest has waited ``chunk_flush_s`` (chunks queued
        during the previous flush may be due at once), unless something urgent is queued."""
        if self.chunk_flush_s <= 0 or self._urgent.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(self._queued_since + self.chunk_flush_s):
                await self._urgent.wait()

    def _commit_failed(self, entries: int, exc: Exception, delay: float) -> None:
        self._metrics.redis_errors.inc()
        log.warning("reply/ack commit failed (%s); retrying %d entries in %.2fs", exc, entries, delay)

    async def _commit(self, batch: list[_Queued]) -> int:
        """Write ``batch`` in order, with the XACK of its entries; returns how many of its items (from
        the first) are committed, and raises if not even the first is."""
        writes = [w for item in batch for w in item.writes]
        due = self._lifetimes.due(writes)  # the streams whose lifetime step runs in this commit
        committed = len(batch)
        if self._use_script:
            try:
                committed = await self._commit_scripts(batch, due)
            except NoPermissionError as exc:
                log.warning("cannot run the commit script (%s); committing with pipelines instead", exc)
                self._use_script = False
        if not self._use_script:
            acks = [item.entry_id for item in batch if item.entry_id is not None]
            await self._write_pipeline(writes, acks, due)
        self._lifetimes.done((w for item in batch[:committed] for w in item.writes), due)
        return committed

    async def _commit_scripts(self, batch: list[_Queued], due: set[str]) -> int:
        """One script call per ``MAX_BATCH`` items, all in one round trip."""
        calls = [batch[i : i + MAX_BATCH] for i in range(0, len(batch), MAX_BATCH)]
        if len(calls) == 1:  # the common case; a pipeline would first ask SCRIPT EXISTS, one more RTT
            self._script_done(await self._script(**self._script_call(batch, due), client=self._redis))
            return len(batch)
        pipe = self._redis.pipeline(transaction=False)
        for call in calls:  # redis-py queues a script on a pipeline (and loads it if missing); untyped
            await self._script(**self._script_call(call, due), client=pipe)  # type: ignore[arg-type]
        results = await pipe.execute(raise_on_error=False)
        committed = 0
        for call, result in zip(calls, results, strict=True):
            if isinstance(result, Exception):
                if committed == 0:
                    raise result
                break  # the calls before it stand; the rest is tried again
            self._script_done(result)
            committed += len(call)
        return committed

    def _script_call(self, items: list[_Queued], due: set[str]) -> dict[str, list[Any]]:
        """The keys and arguments of one commit script call for ``items`` (a TTL only where ``due``)."""
        keys: dict[str, int] = {self._stream: 1}
        flat_writes = []
        for item in items:
            for write in item.writes:
                index = keys.setdefault(write.key, len(keys) + 1)
                flat = [part for pair in write.fields.items() for part in pair]
                counted = int(write.count_trimmed)
                ttl_s = write.ttl_s if write.key in due else 0
                flat_writes.append([index, write.maxlen or 0, ttl_s or 0, flat, counted])
        ack_ids = [item.entry_id for item in items if item.entry_id is not None]
        # One JSON argument instead of a dozen per reply: redis-py encodes each argument in Python,
        # orjson encodes all of it in one call (UTF-8, compact), and Redis decodes it in C (cjson).
        payload = orjson.dumps([flat_writes, ack_ids])
        return {"keys": list(keys), "args": [self._group, payload]}

    def _script_done(self, result: list[Any]) -> None:
        """Log the writes a script call reports rejected and count the dead letters it trimmed."""
        failed, trimmed = result
        _log_rejected(failed)
        if trimmed:
            self._metrics.dead_letters_trimmed.inc(trimmed)

    async def _write_pipeline(self, writes: list[StreamWrite], ack_ids: list[str], due: set[str]) -> None:
        # One lifetime step per due key per batch.
        expiries = {w.key: w.ttl_s for w in writes if w.ttl_s is not None and w.key in due}
        grouped = await self._read_through_groups(list(expiries))
        pipe = self._redis.pipeline(transaction=False)
        counted: list[int] = []  # where each counted write's XLEN-before sits in the results
        for write in writes:
            if write.count_trimmed:
                counted.append(len(pipe))
                pipe.xlen(write.key)
            pipe.xadd(write.key, redis_fields(write.fields), maxlen=write.maxlen, approximate=True)
            if write.count_trimmed:
                pipe.xlen(write.key)
        for key, ttl_s in expiries.items():
            if key in grouped:
                pipe.persist(key)
            else:
                pipe.expire(key, ttl_s)
        if ack_ids and not self._two_step:
            pipe.xack(self._stream, self._group, *ack_ids)
        results = await pipe.execute(raise_on_error=False)
        # A per-command error (a reply key that is not a stream) cannot be retried away, so it is
        # logged and the rest of the batch stands. A node that could not be reached, or a slot without
        # a primary during a failover, fails the batch: it is retried, and never acknowledged unanswered.
        for result in results:
            if isinstance(result, Exception) and transient(result):
                raise result
            if isinstance(result, Exception):
                log.error("Redis rejected a reply or dead-letter write: %s", result)
        self._count_trimmed([results[i : i + 3] for i in counted])
        if ack_ids and self._two_step:
            await self._redis.xack(self._stream, self._group, *ack_ids)

    def _count_trimmed(self, lengths: list[list[Any]]) -> None:
        """Count what the counted XADDs trimmed, from [XLEN before, XADD, XLEN after] each.

        A pipeline is not atomic: another worker's dead letter to the same stream between the three
        commands shifts a drop from one count to the other, but the sum stays right unless both trim.
        """
        trimmed = sum(
            max(before + 1 - after, 0)
            for before, added, after in lengths
            if isinstance(before, int) and isinstance(after, int) and not isinstance(added, Exception)
        )
        if trimmed:
            self._metrics.dead_letters_trimmed.inc(trimmed)

    async def _read_through_groups(self, keys: list[str]) -> set[str]:
        """The keys that are streams with at least one consumer group (pipeline fallback only).

        Without a script this check and the writes cannot be atomic: a group created in between keeps
        the TTL set here until the next reply to its stream clears it.
        """
        if not keys:
            return set()
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.xinfo_groups(key)
        results = await pipe.execute(raise_on_error=False)  # no such key / not a stream: no group
        return {key for key, groups in zip(keys, results, strict=True) if isinstance(groups, list) and groups}


# KEYS: the input stream, then every key written. ARGV: the group, then JSON
# [[[key index, maxlen or 0, ttl or 0, [field, value, ...], count trimmed 0/1], ...],
#  [entry id to XACK, ...]].
# Returns [the rejected writes, the entries trimmed by the counted writes (XLEN before + 1 - after)].
# A write Redis rejects (a key of another type) is reported and skipped; the batch is still acked,
# exactly as a pipeline would behave. Each key written with a ttl gets one lifetime step: PERSIST if
# some consumer group reads it (an expiry would delete the group), else EXPIRE. PERSIST runs under
# pcall so an ACL without +persist costs a logged error, never a half-applied commit. XACK is chunked
# below Lua's unpack() stack limit.
_COMMIT_LUA = """
local batch = cjson.decode(ARGV[2])
local ttls = {}
local failed = {}
local trimmed = 0
for _, w in ipairs(batch[1]) do
  local key, maxlen, ttl, fields, count = KEYS[w[1]], w[2], w[3], w[4], w[5] == 1
  local ok
  local before = count and redis.pcall('XLEN', key)
  if maxlen > 0 then
    ok = redis.pcall('XADD', key, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  else
    ok = redis.pcall('XADD', key, '*', unpack(fields))
  end
  if type(ok) == 'table' and ok.err then
    failed[#failed + 1] = key .. ': ' .. ok.err
  else
    local after = count and redis.pcall('XLEN', key)
    if type(before) == 'number' and type(after) == 'number' then
      trimmed = trimmed + before + 1 - after
    end
    if ttl > 0 then
      ttls[key] = ttl
    end
  end
end
for key, ttl in pairs(ttls) do
  if #redis.call('XINFO', 'GROUPS', key) > 0 then
    local ok = redis.pcall('PERSIST', key)
    if type(ok) == 'table' and ok.err then
      failed[#failed + 1] = 'PERSIST ' .. key .. ' (read through a consumer group): ' .. ok.err
    end
  else
    redis.call('EXPIRE', key, ttl)
  end
end
local ids = batch[2]
for i = 1, #ids, 1000 do
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids, i, math.min(i + 999, #ids)))
end
return {failed, trimmed}
"""


def redis_fields(fields: Mapping[str, str]) -> dict[FieldT, EncodableT]:
    """The same fields, typed as redis-py's XADD wants them."""
    return {name: value for name, value in fields.items()}


class OutboxAbandoned(RuntimeError):
    """The entry's writes were never confirmed; it was not acknowledged."""


def _log_rejected(failed: list[str]) -> None:
    for error in failed:
        log.error("Redis rejected a reply or dead-letter write: %s", error)


def _report(batch: list[_Queued], error: BaseException | None) -> None:
    for item in batch:
        try:
            item.on_done(error)
        except Exception:
            log.exception("outcome callback for %s failed", item.entry_id or "a chunk")
