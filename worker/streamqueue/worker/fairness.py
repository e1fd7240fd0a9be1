"""Per-user fairness: entries start round-robin across users instead of in arrival order.

In arrival order one user's burst of 1,000 messages makes every other user wait for all of it. With
``fairness=perUser`` a partition's entries go through a fair queue in Redis first (start-time fair
queueing, one unit of cost per message):

- intake: every worker of the partition moves new entries from the stream into the queue as they
  arrive, far faster than handlers take them (a script: ``XREADGROUP`` as ``wire.FAIR_CONSUMER``, then
  ``ZADD`` each entry with its user's next tag = max(user's last tag, virtual time) + 1);
- dispatch: a worker with free slots pops the lowest tags (``ZPOPMIN``), advances the virtual time to
  the last tag popped and ``XCLAIM``s those entries to itself, in one script.

So a user's tags count their own backlog while a newcomer starts at the virtual time: at most one
entry of each other waiting user has a tag at or below the newcomer's, plus one tie (ties pop in
entry-id order). A message from a user with nothing waiting is dispatched within the next
``2 * (users waiting) - 1`` dispatches of its partition, however long anyone's backlog is; that bound
is what ``bench/fairness.py`` measures. A user's own entries keep their order (their tags increase).

Nothing leaves the consumer group: an entry waiting its turn is pending under ``FAIR_CONSUMER``, so
the operator's backlog (pending + lag), trimming (never past a pending entry) and at-least-once
delivery are unchanged, and both scripts are atomic, so a worker dying anywhere loses nothing. The
reclaimer must not take those entries for idle ones (they wait on purpose): ``FairPending`` claims
idle entries of every consumer but that one. An entry a worker hands back or leaves behind (crash,
shutdown, failure) is retried by the reclaimers ahead of its turn: it has had its turn.

Each partition keeps its own clock: partitions already isolate users from each other (each has its own
share of a worker's slots), and fairness orders users within one. With ``ordering=perUser`` a user's
entries are popped in order and the per-user gate still runs them one at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import Any

from .. import wire
from ..aio import wait_set
from ..connection import RedisClient, group_missing, retry_transient, transient
from .reclaim import Delivery, PendingOwnership

log = logging.getLogger(__name__)
# Entries moved per intake call: one script call stays within a few milliseconds of Redis time.
INTAKE_BATCH = 500
# Pending-list rows one reclaim step reads past (mostly entries waiting their fair turn).
_RECLAIM_SCAN = 1000
# Idle users' tags pruned per dispatch (a tag at or below the virtual time says nothing).
_PRUNE_STEP = 64

# KEYS: stream, fair queue, clock. ARGV: group, fair consumer, count, user_id field, longest user id.
# Returns {entries moved, id of the newest entry seen} (the id to wait after for more).
_INTAKE_LUA = """
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
if not reply then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #newest == 0 then return {0, '0-0'} end
  return {0, newest[1][1]}
end
local entries = reply[1][2]
local now = tonumber(redis.call('HGET', KEYS[3], ':now') or '0')
local longest = tonumber(ARGV[5])
local tags = {}
for _, entry in ipairs(entries) do
  local fields, user = entry[2], ''
  for i = 1, #fields, 2 do
    if fields[i] == ARGV[4] then user = fields[i + 1] break end
  end
  if #user > longest or string.sub(user, 1, 1) == ':' then user = '' end  -- invalid: dead-lettered soon
  local tag = tags[user] or tonumber(redis.call('HGET', KEYS[3], user) or '0')
  if tag < now then tag = now end
  tag = tag + 1
  tags[user] = tag
  redis.call('ZADD', KEYS[2], tag, entry[1])
end
for user, tag in pairs(tags) do redis.call('HSET', KEYS[3], user, tag) end
return {#entries, entries[#entries][1]}
"""

# KEYS: stream, fair queue, clock. ARGV: group, consumer, count, prune step.
# Returns the claimed entries as XCLAIM does ({id, {field, value, ...}}, ...), delivery count 1.
_DISPATCH_LUA = """
local popped = redis.call('ZPOPMIN', KEYS[2], ARGV[3])
if #popped == 0 then return {} end
local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 1, #popped, 2 do claim[#claim + 1] = popped[i] end
claim[#claim + 1] = 'RETRYCOUNT'
claim[#claim + 1] = 1
local now = tonumber(redis.call('HGET', KEYS[3], ':now') or '0')
local last = tonumber(popped[#popped])
if last > now then
  now = last
  redis.call('HSET', KEYS[3], ':now', popped[#popped])
end
local scan = redis.call('HSCAN', KEYS[3], redis.call('HGET', KEYS[3], ':cursor') or '0', 'COUNT', ARGV[4])
for i = 1, #scan[2], 2 do
  local user = scan[2][i]
  if string.sub(user, 1, 1) ~= ':' and tonumber(scan[2][i + 1]) <= now then
    redis.call('HDEL', KEYS[3], user)
  end
end
redis.call('HSET', KEYS[3], ':cursor', scan[1])
return redis.call(unpack(claim))
"""

# XAUTOCLAIM that leaves one consumer's entries alone. KEYS: stream.
# ARGV: group, consumer, min idle ms, start, count, consumer to skip, rows to scan.
# Returns {next start ('0-0' once the scan wrapped), claimed entries, {id, deliveries, ...}}.
_RECLAIM_LUA = """
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], ARGV[4], '+', ARGV[7])
local ids, counts, last = {}, {}, nil
local wanted = tonumber(ARGV[5])
for _, row in ipairs(rows) do
  last = row[1]
  if row[2] ~= ARGV[6] then
    ids[#ids + 1] = row[1]
    counts[#counts + 1] = row[1]
    counts[#counts + 1] = row[4] + 1
    if #ids >= wanted then break end
  end
end
local cursor = '0-0'
if last ~= nil and (#ids >= wanted or #rows >= tonumber(ARGV[7])) then cursor = '(' .. last end
if #ids == 0 then return {cursor, {}, {}} end
local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], unpack(ids))
return {cursor, claimed, counts}
"""


def _waited_out(exc: BaseException) -> bool:
    """Errors the fair intake waits out: Redis away, or the group not created yet (the consumer run
    creates it)."""
    return transient(exc) or group_missing(exc)


def _deliveries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """XCLAIM's reply as returned through a script: ``[[id, [field, value, ...]], ...]``; an entry
    deleted while pending is left out (Redis 7 drops it; 6.2 returned it without fields)."""
    return [(i, dict(zip(flat[::2], flat[1::2], strict=True))) for i, flat in reply if isinstance(flat, list)]


class FairQueue:
    """One partition's fair queue: the intake task that fills it and the dispatch that empties it."""

    def __init__(self, redis: RedisClient, stream: str, group: str, *, block_ms: int) -> None:
        self._redis = redis
        self._stream = stream
        self._group = group
        self._keys = [stream, wire.fair_key(stream), wire.fair_clock_key(stream)]
        self._block_ms = block_ms
        self._intake = redis.register_script(_INTAKE_LUA)
        self._dispatch = redis.register_script(_DISPATCH_LUA)
        self._arrived = asyncio.Event()  # set when entries may have reached the queue

    async def run_intake(self, stop: asyncio.Event) -> None:
        """Move new entries into the queue as they arrive, until ``stop`` is set (then within the
        block time: a blocking read is not cancelled, as redis-py would retry it).

        Every worker of the partition runs one; the script is atomic, so they share the work. Redis
        errors are waited out (the group may not exist yet: the consumer run creates it).
        """
        while not stop.is_set():
            await retry_transient(self._intake_round, self._intake_waits, stop=stop, retryable=_waited_out)

    async def _intake_round(self) -> None:
        """Move what has arrived, then block until something more does (or the block time ends)."""
        newest = await self._move_all()
        self._arrived.set()
        await self._redis.xread({self._stream: newest}, count=1, block=self._block_ms)

    def _intake_waits(self, exc: Exception, delay: float) -> None:
        log.debug("fair intake of %s waits %.2fs: %s", self._stream, delay, exc)

    async def _move_all(self) -> str:
        """Move everything undelivered; return the newest entry id seen."""
        while True:
            moved, newest = await self._intake(
                keys=self._keys,
                args=[self._group, wire.FAIR_CONSUMER, INTAKE_BATCH, wire.USER_ID, wire.MAX_USER_ID_LENGTH],
            )
            if int(moved) < INTAKE_BATCH:
                return str(newest)
            self._arrived.set()

    async def take(self, count: int, consumer: str) -> list[Delivery]:
        """Up to ``count`` entries in fair order, claimed by ``consumer``; waits up to the block time
        for some to arrive when the queue is empty (an empty list then, as a timed-out read)."""
        self._arrived.clear()  # before the pop: an arrival from now on wakes the wait below
        reply = await self._dispatch(keys=self._keys, args=[self._group, consumer, count, _PRUNE_STEP])
        if not reply:
            await wait_set(self._arrived, self._block_ms / 1000)
            return []
        return [Delivery(entry_id, fields, 1) for entry_id, fields in _deliveries(reply)]


class FairPending(PendingOwnership):
    """Reclaims idle entries of every consumer except the fair queue's (those wait their turn)."""

    def __init__(self, redis: RedisClient, stream: str, group: str, consumer: str, claim_idle_ms: int):
        super().__init__(redis, stream, group, consumer, claim_idle_ms)
        self._reclaim = redis.register_script(_RECLAIM_LUA)

    async def claim(
        self, count: int, mine: Collection[str], min_idle_ms: int | None = None
    ) -> tuple[list[Delivery], bool]:
        """One scan step, as ``PendingOwnership.claim``; deleted entries leave the pending list with
        the XCLAIM (Redis 7), so there is nothing to acknowledge here."""
        idle = self._claim_idle_ms if min_idle_ms is None else min_idle_ms
        cursor, claimed, counts = await self._reclaim(
            keys=[self._stream],
            args=[self._group, self._consumer, idle, self._cursor, count, wire.FAIR_CONSUMER, _RECLAIM_SCAN],
        )
        self._cursor = str(cursor)
        deliveries = {str(i): int(n) for i, n in zip(counts[::2], counts[1::2], strict=True)}
        entries = [
            Delivery(entry_id, fields, deliveries.get(entry_id, 1))
            for entry_id, fields in _deliveries(claimed)
            if entry_id not in mine
        ]
        return entries, self._cursor == "0-0"
