"""Observe a queue: XINFO GROUPS + XINFO STREAM of every partition, pipelined in one round trip.

A partitioned queue is summed into one ``Observation`` (its backlog is the sum; each partition's is
kept for status and metrics). On a Redis Cluster redis-py sends the pipeline as one batch per node,
so a poll costs one round trip per node however many partitions there are.

The result is a plain value (``Observation``) so the decision can stay a pure function. Redis
reports a group's lag as nil when it cannot count it (after XDEL, XTRIM or XGROUP SETID); then the
lag is estimated from above and flagged, never read as zero, so a queue with waiting messages is
never mistaken for an idle one (KEDA's lag mode treats nil as inactive).

The same pipeline reads the queue's limit-bound key (``wire.limit_bound_key``): the workers keep it
while their model-API calls wait for a shared limit, so more pods would not help. It only adds to an
observation: an error reading it (an ACL without GET on it, a wrong type) counts as not bound, and a
Redis outage is already reported by the XINFO replies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis
import redis.asyncio
from streamqueue import wire
from streamqueue.connection import group_missing
from streamqueue.wire import GroupInfo

from .deletion_cost import ConsumerLoad, combine_loads, loads_from_reply

# The reason recorded for a limit-bound key whose value is none of wire.LIMIT_REASONS (a newer worker):
# the key's presence is what means "bound".
UNKNOWN_LIMIT = "UnknownLimit"


@dataclass(frozen=True)
class Observation:
    """What one poll saw. ``error`` set means Redis could not be read; the counts are then meaningless."""

    at: float
    error: str | None = None
    group_missing: bool = False
    stream_length: int = 0
    entries_added: int = 0
    last_generated_id: str = "0-0"
    lag: int = 0
    lag_estimated: bool = False
    pending: int = 0
    entries_read: int | None = None
    consumers: int = 0
    # Backlog per partition stream (only for a partitioned queue).
    partitions: tuple[tuple[str, int], ...] = field(default=())
    # The model-API limit the workers' calls wait for (a wire.LIMIT_* reason); None: not limit-bound.
    limit_bound: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.group_missing

    @property
    def backlog(self) -> int:
        """Work not yet done: undelivered (lag) plus delivered but unacknowledged (pending)."""
        return self.lag + self.pending


def estimate_lag(group: GroupInfo, stream_length: int, entries_added: int, last_generated_id: str) -> int:
    """An upper bound on undelivered entries when Redis reports lag as nil.

    ``entries-added - entries-read`` counts deleted entries too, so it can only overestimate; the
    stream length bounds it. Overestimating costs a few extra pods for one poll, underestimating
    could leave messages waiting with no worker.
    """
    if wire.parse_entry_id(group.last_delivered_id) >= wire.parse_entry_id(last_generated_id):
        return 0
    if group.entries_read is None:
        return stream_length
    return max(0, min(stream_length, entries_added - group.entries_read))


def from_replies(at: float, group_name: str, groups_reply: Any, stream_reply: Any) -> Observation:
    """Build an Observation from the two XINFO replies (exceptions included, as a pipeline returns them)."""
    for reply in (groups_reply, stream_reply):
        if _no_such_key(reply):
            return Observation(at=at, group_missing=True)
        if isinstance(reply, Exception):
            return Observation(at=at, error=f"{type(reply).__name__}: {reply}")
    stream = stream_reply
    base = Observation(
        at=at,
        stream_length=int(stream["length"]),
        entries_added=int(stream.get("entries-added") or stream["length"]),
        last_generated_id=str(stream["last-generated-id"]),
    )
    groups = (GroupInfo.from_reply(g) for g in groups_reply)
    mine = next((g for g in groups if g.name == group_name), None)
    if mine is None:
        return replace(base, group_missing=True)
    lag, estimated = mine.lag, False
    if lag is None:
        lag = estimate_lag(mine, base.stream_length, base.entries_added, base.last_generated_id)
        estimated = True
    return replace(
        base,
        lag=lag,
        lag_estimated=estimated,
        pending=mine.pending,
        entries_read=mine.entries_read,
        consumers=mine.consumers,
    )


def limit_reason(reply: Any) -> str | None:
    """The limit-bound key's GET reply as a reason: None when absent or unreadable (see the module doc)."""
    if reply is None or isinstance(reply, Exception):
        return None
    value = reply.decode() if isinstance(reply, bytes) else str(reply)
    return value if value in wire.LIMIT_REASONS else UNKNOWN_LIMIT


async def observe(
    client: Any, streams: Sequence[str], group: str, at: float, limit_key: str | None = None
) -> Observation:
    """Read every partition, and ``limit_key`` when given, in one pipeline; connection failures become
    an error Observation."""
    try:
        async with client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xinfo_groups(stream)
                pipe.xinfo_stream(stream)
            if limit_key is not None:
                pipe.get(limit_key)
            replies = await pipe.execute(raise_on_error=False)
    except (redis.RedisError, OSError) as exc:
        return Observation(at=at, error=f"{type(exc).__name__}: {exc}")
    parts = [from_replies(at, group, replies[2 * i], replies[2 * i + 1]) for i in range(len(streams))]
    obs = parts[0] if len(parts) == 1 else combine(at, streams, parts)
    if limit_key is None or obs.error is not None:
        return obs
    return replace(obs, limit_bound=limit_reason(replies[-1]))


def combine(at: float, streams: Sequence[str], parts: Sequence[Observation]) -> Observation:
    """One queue from its partitions. A partition whose group is missing counts its whole stream as
    undelivered (its workers have not started yet); the queue's group is missing only if every one is."""
    failed = next((p for p in parts if p.error is not None), None)
    if failed is not None:
        return failed
    if all(p.group_missing for p in parts):
        return Observation(at=at, group_missing=True, stream_length=sum(p.stream_length for p in parts))
    lags = [p.stream_length if p.group_missing else p.lag for p in parts]
    reads = [p.entries_read for p in parts if not p.group_missing]
    return Observation(
        at=at,
        stream_length=sum(p.stream_length for p in parts),
        entries_added=sum(p.entries_added for p in parts),
        last_generated_id=max((p.last_generated_id for p in parts), key=wire.parse_entry_id),
        lag=sum(lags),
        lag_estimated=any(p.lag_estimated or p.group_missing for p in parts),
        pending=sum(p.pending for p in parts),
        entries_read=None if any(r is None for r in reads) else sum(r for r in reads if r is not None),
        consumers=max(p.consumers for p in parts),  # each worker consumes every partition it holds
        partitions=tuple((s, lag + p.pending) for s, lag, p in zip(streams, lags, parts, strict=True)),
    )


async def consumer_loads(client: Any, streams: Sequence[str], group: str) -> dict[str, ConsumerLoad]:
    """Each consumer's load over every partition: ``XINFO CONSUMERS`` of each in one pipeline (one
    round trip per node on a cluster), combined per consumer (pod). A partition without the group or
    stream yet has no consumers; any other error is raised, as is a connection failure."""
    async with client.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_consumers(stream, group)
        replies = await pipe.execute(raise_on_error=False)
    loads = []
    for reply in replies:
        if group_missing(reply) or _no_such_key(reply):
            continue
        if isinstance(reply, Exception):
            raise reply
        loads.append(loads_from_reply(reply))
    return combine_loads(loads)


def _no_such_key(reply: Any) -> bool:
    return isinstance(reply, redis.ResponseError) and "no such key" in str(reply).lower()
