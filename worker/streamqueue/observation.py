"""A queue's backlog from its ``XINFO`` replies: one ``Observation`` per partition, combined into the queue's.

Pure, and shared by the operator (``streamqueue_operator.observe`` reads the replies and scales on the
result) and the monitor (which shows the same totals), so both count a partitioned queue the same way.
It lives in the worker package because the operator depends on it, never the other way round: the
worker image has no operator code.

Redis reports a group's lag as nil when it cannot count it (after XDEL, XTRIM or XGROUP SETID); then
the lag is estimated from above and flagged, never read as zero, so a queue with waiting messages is
never mistaken for an idle one (KEDA's lag mode treats nil as inactive).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from . import wire
from .wire import GroupInfo


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
        if no_such_key(reply):
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


def add_reads(pipe: Any, streams: Sequence[str]) -> None:
    """Queue XINFO GROUPS and XINFO STREAM of every partition on ``pipe``, as ``from_pipeline`` reads them:
    one round trip (per node on a cluster) observes the whole queue (the gateway's backlog check)."""
    for stream in streams:
        pipe.xinfo_groups(stream)
        pipe.xinfo_stream(stream)


def from_pipeline(at: float, group: str, streams: Sequence[str], replies: Sequence[Any]) -> Observation:
    """The queue's Observation from the replies to ``add_reads`` (exceptions included, first in order)."""
    parts = [from_replies(at, group, replies[2 * i], replies[2 * i + 1]) for i in range(len(streams))]
    return parts[0] if len(parts) == 1 else combine(at, streams, parts)


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


def no_such_key(reply: Any) -> bool:
    """XINFO's error for a stream that does not exist (yet)."""
    return isinstance(reply, redis.ResponseError) and "no such key" in str(reply).lower()
