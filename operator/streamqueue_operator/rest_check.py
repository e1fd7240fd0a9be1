"""Which queues at rest have work: the cheap check ``redis_hub.RestSweep`` runs for all of them.

A queue at rest (``scaler.Rest``) has nothing to decide until its group is no longer idle: its first
message makes the lag 1 (or nil, after an XDEL), a delivery makes entries pending. Checking that per
queue cost redis-py a command, a reply read with its own timeout and a parse per partition, about
25 µs each; here one script call answers for up to ``redis_hub.MAX_BATCH_QUEUES`` queues with the few
indexes that are not idle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from streamqueue.wire import GroupInfo

# KEYS: streams; ARGV[i]: the group of KEYS[i]. The 1-based indexes of the streams whose group is
# not idle: missing, lag not 0 (nil included) or entries pending; an error reply counts as not idle.
_NOT_IDLE = """
local woken = {}
for i, key in ipairs(KEYS) do
  local groups = redis.pcall('XINFO', 'GROUPS', key)
  local idle = false
  if not groups.err then
    for _, g in ipairs(groups) do
      local f = {}
      for j = 1, #g, 2 do f[g[j]] = g[j + 1] end
      if f['name'] == ARGV[i] then idle = f['lag'] == 0 and f['pending'] == 0 end
    end
  end
  if not idle then woken[#woken + 1] = i end
end
return woken
"""


async def not_idle(client: Any, checks: Sequence[tuple[str, str]], cluster: bool) -> set[int]:
    """The indexes of ``checks`` ((stream, group) pairs) whose group is not idle (lag 0, not nil, and
    nothing pending): a message, a delivery, a missing group or stream, an error reply. On one Redis
    one script call; on a cluster, whose keys need not share a slot, a pipeline of ``XINFO GROUPS``
    (one round trip per node). Raises a connection failure."""
    if not cluster:
        streams, groups = [stream for stream, _ in checks], [group for _, group in checks]
        return {int(i) - 1 for i in await client.eval(_NOT_IDLE, len(streams), *streams, *groups)}
    async with client.pipeline(transaction=False) as pipe:
        for stream, _ in checks:
            pipe.xinfo_groups(stream)
        replies = await pipe.execute(raise_on_error=False)
    return {
        i
        for i, (reply, (_, group)) in enumerate(zip(replies, checks, strict=True))
        if not _group_idle(reply, group)
    }


def _group_idle(reply: Any, group: str) -> bool:
    if isinstance(reply, Exception):
        return False
    info = next((g for g in map(GroupInfo.from_reply, reply) if g.name == group), None)
    return info is not None and info.lag == 0 and info.pending == 0
