"""The monitor's Redis reads: every partition of a queue in one pipeline (one round trip per node on a
cluster), then their groups' consumers, then a bounded SCAN of the reply streams."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis

from .. import wire
from ..connection import RedisClient
from ..observation import Observation, combine, from_replies, no_such_key
from .settings import MAX_PARTITIONS, MonitorSettings
from .views import ConsumerView, GroupView, QueueView, Snapshot, StreamView

_SCAN_BATCH = 1000


async def observe(redis: RedisClient, settings: MonitorSettings) -> Snapshot:
    """Read everything shown in one refresh: per queue (all its partitions at once) two or three
    pipelined round trips per node, then the reply-stream SCAN."""
    queues = [
        await observe_queue(redis, name, settings.partitions, settings.dead_letter_stream)
        for name in settings.stream
    ]
    count, complete = await count_streams(redis, settings.reply_prefix, settings.scan_limit)
    return Snapshot(time.time(), queues, settings.reply_prefix, count, complete)


async def observe_queue(
    redis: RedisClient, name: str, partitions: int | None, dead_letter_stream: str | None
) -> QueueView:
    """One queue, all its partitions (``None``: detected); also ``kubectl sq status``'s Redis part."""
    detected = partitions is None
    if partitions is None:
        partitions = await detect_partitions(redis, name)
    keys = wire.partition_streams(name, partitions)
    dead_letters = [dead_letter_stream or wire.dead_letter_stream(key) for key in keys]
    parts, totals = await _observe_streams(redis, keys, dead_letters)
    return QueueView(name, partitions, detected, parts, totals)


async def detect_partitions(redis: RedisClient, stream: str) -> int:
    """1 + the highest ``p`` for which ``<stream>:{p}`` exists, or 1 when none does.

    One pipelined EXISTS per possible partition (split per node on a cluster): exact whatever the
    keyspace holds, where a SCAN would have to walk every key. Workers create every partition when
    they start, so before that a queue whose highest partitions were never written shows fewer.
    """
    pipe = redis.pipeline(transaction=False)
    for p in range(MAX_PARTITIONS):
        pipe.exists(wire.partition_stream(stream, p, MAX_PARTITIONS))
    found = [p for p, exists in enumerate(await pipe.execute()) if exists]
    return found[-1] + 1 if found and found[-1] > 0 else 1


async def _observe_streams(
    redis: RedisClient, names: list[str], dead_letters: list[str]
) -> tuple[list[StreamView], dict[str, Observation]]:
    """Every stream of a queue in one pipeline, then the consumers of all their groups in another;
    with each group's totals over the streams."""
    pipe = redis.pipeline(transaction=False)
    for name, dead_letter in zip(names, dead_letters, strict=True):
        pipe.xinfo_stream(name)
        pipe.xinfo_groups(name)
        pipe.xlen(dead_letter)
        pipe.get(wire.lease_key(name))
    replies = await pipe.execute(raise_on_error=False)
    views: list[StreamView] = []
    groups_of: list[tuple[str, list[dict[str, Any]]]] = []
    for i, (name, dead_letter) in enumerate(zip(names, dead_letters, strict=True)):
        info, groups, dead_length, lease = replies[4 * i : 4 * i + 4]
        if isinstance(dead_length, Exception):
            raise dead_length
        if no_such_key(info):  # not used yet
            views.append(StreamView(name, False, 0, 0, "-", dead_letter, int(dead_length), []))
            continue
        for result in (info, groups, lease):
            if isinstance(result, Exception):
                raise result
        views.append(
            StreamView(
                name=name,
                exists=True,
                length=info["length"],
                entries_added=info.get("entries-added", 0),
                last_id=info["last-generated-id"],
                dead_letter=dead_letter,
                dead_letter_length=dead_length,
                groups=[],
                lease=lease,
            )
        )
        groups_of.append((name, groups))
    consumers = await _observe_consumers(redis, [(name, g["name"]) for name, gs in groups_of for g in gs])
    by_name = {name: groups for name, groups in groups_of}
    return [
        replace(view, groups=[_group_view(g, consumers[view.name, g["name"]]) for g in by_name[view.name]])
        if view.exists
        else view
        for view in views
    ], _totals(names, replies[0::4], replies[1::4])


def _totals(names: Sequence[str], infos: Sequence[Any], groups: Sequence[Any]) -> dict[str, Observation]:
    """Each group's backlog over the queue's partitions from the XINFO STREAM and XINFO GROUPS replies,
    by the operator's own rules: a partition without the group counts its whole stream as undelivered,
    a lag Redis cannot tell is estimated from above."""
    at = time.time()
    group_names = dict.fromkeys(g["name"] for gs in groups if not isinstance(gs, Exception) for g in gs)
    return {
        group: combine(
            at, names, [from_replies(at, group, gs, info) for info, gs in zip(infos, groups, strict=True)]
        )
        for group in group_names
    }


async def _observe_consumers(
    redis: RedisClient, stream_groups: list[tuple[str, str]]
) -> dict[tuple[str, str], list[ConsumerView]]:
    if not stream_groups:
        return {}
    pipe = redis.pipeline(transaction=False)
    for stream, group in stream_groups:
        pipe.xinfo_consumers(stream, group)
    results = await pipe.execute()
    return {
        key: [ConsumerView(c["name"], c["pending"], c["idle"], c.get("inactive")) for c in consumers]
        for key, consumers in zip(stream_groups, results, strict=True)
    }


def _group_view(info: dict[str, object], consumers: list[ConsumerView]) -> GroupView:
    return GroupView(**vars(wire.GroupInfo.from_reply(info)), members=consumers)


async def count_streams(redis: RedisClient, prefix: str, scan_limit: int) -> tuple[int, bool]:
    """Count stream keys starting with ``prefix``; stops after ``scan_limit`` keys have been scanned.

    Returns (count, complete). SCAN walks the whole keyspace, so the limit keeps one refresh cheap on
    a Redis with millions of keys; the view then shows the count as a lower bound. On a cluster each
    primary holds its own keys: they are scanned in turn, one batch each per round (as redis-py's
    cluster ``scan_iter`` does, which has no bound), so a limit leaves every node partly counted.
    """
    pattern = _glob_escape(prefix) + "*"
    if not isinstance(redis, aioredis.RedisCluster):
        cursor, count, scanned = 0, 0, 0
        while True:
            cursor, keys = await redis.scan(cursor, match=pattern, count=_SCAN_BATCH, _type="stream")
            count += len(keys)
            scanned += _SCAN_BATCH
            if cursor == 0:
                return count, True
            if scanned >= scan_limit:
                return count, False
    await redis.initialize()  # the slot map, so the primaries are known (a no-op once done)
    cursors = {node.name: 0 for node in redis.get_primaries()}
    nodes = {node.name: node for node in redis.get_primaries()}
    count, scanned = 0, 0
    while cursors:
        for name, cursor in list(cursors.items()):
            replies: Any  # a cluster's SCAN replies with each node's cursor: {node name: cursor}
            replies, keys = await redis.scan(
                cursor, match=pattern, count=_SCAN_BATCH, _type="stream", target_nodes=nodes[name]
            )
            count += len(keys)
            scanned += _SCAN_BATCH
            cursors[name] = replies[name]
            if cursors[name] == 0:
                del cursors[name]
        if cursors and scanned >= scan_limit:
            return count, False
    return count, True


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
