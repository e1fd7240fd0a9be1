"""Housekeeping on the queue's Redis: remove dead consumers, trim fully processed entries.

Both run as Lua scripts so the check and the write are atomic: XGROUP DELCONSUMER drops the
consumer's pending entries, so it runs only if XPENDING for that consumer is empty at that very
moment; XTRIM MINID is computed from every group's oldest pending entry and last-delivered ID in
the same script that trims, so a group created or rewound concurrently cannot lose entries.

The group may be shared with workers the operator does not run (the article's own loop, consumers
named ``worker_1``). Only a consumer whose name could be a Pod's is a candidate for removal: any
other name was chosen by another program, whose lifetime the operator cannot know.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from streamqueue.connection import RedisClient

# Returns -1 (and deletes nothing) while the consumer still owns pending entries.
_DELETE_IF_IDLE = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

# The oldest entry some group still needs: its oldest pending entry, else the one after its
# last-delivered ID (undelivered). Entries below the minimum over all groups are acknowledged by
# every group. No groups: nothing is known to be processed, nothing is trimmed.
_TRIM_PROCESSED = """
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return 0 end
local best_ms, best_seq = nil, nil
for _, g in ipairs(groups) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  local ms, seq
  if f['pending'] > 0 then
    local summary = redis.call('XPENDING', KEYS[1], f['name'])
    ms, seq = string.match(summary[2], '(%d+)-(%d+)')
    ms, seq = tonumber(ms), tonumber(seq)
  else
    ms, seq = string.match(f['last-delivered-id'], '(%d+)-(%d+)')
    ms, seq = tonumber(ms), tonumber(seq) + 1
  end
  if best_ms == nil or ms < best_ms or (ms == best_ms and seq < best_seq) then
    best_ms, best_seq = ms, seq
  end
end
return redis.call('XTRIM', KEYS[1], 'MINID', string.format('%.0f-%.0f', best_ms, best_seq))
"""


# A Pod name is a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', at most 253 characters.
_POD_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_POD_NAME_MAX = 253


@dataclass(frozen=True)
class ConsumerCleanup:
    deleted: tuple[str, ...]
    kept_with_pending: tuple[str, ...]
    not_pod_names: tuple[str, ...] = ()  # consumers of other programs, never touched


def could_be_pod_name(name: str) -> bool:
    """True if a Pod could be called ``name``; the worker's consumer name is its Pod's name."""
    return len(name) <= _POD_NAME_MAX and _POD_NAME.fullmatch(name) is not None


async def remove_dead_consumers(
    client: RedisClient, stream: str, group: str, live_pods: Collection[str]
) -> ConsumerCleanup:
    """Delete consumers named after Pods that no longer exist, once nothing is pending for them.

    Consumers with pending entries are kept: the workers' XAUTOCLAIM moves those entries to a live
    consumer after ``claimIdle``, and a later pass deletes the then-empty consumer. Consumers whose
    names no Pod can have belong to workers outside the Deployment and are left alone, busy or idle.
    """
    deleted, kept, foreign = [], [], []
    for info in await client.xinfo_consumers(stream, group):
        name = str(info["name"])
        if name in live_pods:
            continue
        if not could_be_pod_name(name):
            foreign.append(name)
        elif await client.eval(_DELETE_IF_IDLE, 1, stream, group, name) == -1:
            kept.append(name)
        else:
            deleted.append(name)
    return ConsumerCleanup(tuple(deleted), tuple(kept), tuple(foreign))


async def trim_processed(client: RedisClient, stream: str) -> int:
    """XTRIM MINID below the oldest entry any group still needs; returns the number of entries removed."""
    return int(await client.eval(_TRIM_PROCESSED, 1, stream))
