"""``streamqueue-monitor``: a live terminal view of a queue's streams, groups, consumers and backlog.

What the article's ``stream_info.py`` showed, for any queue: the names come from flags or the same
``STREAMQUEUE_*`` environment variables the worker reads, and reply streams are counted with a bounded
SCAN of the reply prefix instead of a hard-coded user list.

A partitioned queue (``<stream>:{0}`` .. ``<stream>:{N-1}``, see ``wire.partition_stream``) is shown
partition by partition with the queue's totals; N comes from ``--partitions`` (``STREAMQUEUE_PARTITIONS``,
as in the worker's pod) or, unset, is detected from which partition keys exist. With ``--redis-cluster``
the URL names one node of a Redis Cluster: every partition is read in one pipeline (one round trip per
node) and the reply-stream SCAN walks every primary.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any

import redis.asyncio as aioredis
from pydantic import Field, field_validator
from pydantic_settings import CliApp, NoDecode, SettingsConfigDict
from redis.exceptions import RedisError, ResponseError

from . import wire
from .connection import RedisClient, RedisSettings, connect_any

_CLEAR_SCREEN = "\x1b[H\x1b[2J"
_SCAN_BATCH = 1000
# The most partitions a queue can have (the worker's and the operator's bound); detection probes them all.
MAX_PARTITIONS = 1024


class MonitorSettings(RedisSettings):
    """What to watch; every flag also reads ``STREAMQUEUE_<NAME>`` like the worker's settings."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMQUEUE_",
        cli_prog_name="streamqueue-monitor",
        cli_kebab_case=True,
        cli_implicit_flags=True,
    )

    # NoDecode: STREAMQUEUE_STREAM holds one plain name for the worker, not JSON; commas add more.
    stream: Annotated[list[str], NoDecode] = Field(
        default=[wire.DEFAULT_STREAM],
        description="input stream(s) to watch (repeat the flag, or separate names with commas)",
    )
    reply_prefix: str = Field(
        default=wire.DEFAULT_REPLY_PREFIX, description="reply stream prefix (counted with SCAN)"
    )
    dead_letter_stream: str | None = Field(
        default=None, description="dead-letter stream (default: <stream>:dead for each stream)"
    )
    partitions: int | None = Field(
        default=None,
        ge=1,
        le=MAX_PARTITIONS,
        description="partitions of each stream, <stream>:{0}..{N-1} (default: detected from the keys)",
    )
    interval: float = Field(default=1.0, gt=0, description="seconds between refreshes")
    once: bool = Field(default=False, description="print one snapshot and exit (no screen clearing)")

    scan_limit: int = Field(
        default=100_000, gt=0, description="stop counting reply streams after this many keys scanned"
    )

    @field_validator("stream", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        names = [value] if isinstance(value, str) else value
        if isinstance(names, list):
            return [part.strip() for name in names for part in str(name).split(",") if part.strip()]
        return value


@dataclass(frozen=True)
class ConsumerView:
    name: str
    pending: int
    idle_ms: int
    inactive_ms: int | None  # Redis >= 7.2 only


@dataclass(frozen=True)
class GroupView(wire.GroupInfo):
    members: list[ConsumerView]

    @property
    def backlog(self) -> str:
        """Lag + pending, shown as a lower bound when the lag is unknown."""
        return f"{self.pending + self.lag}" if self.lag is not None else f">={self.pending}"


@dataclass(frozen=True)
class StreamView:
    name: str
    exists: bool
    length: int
    entries_added: int
    last_id: str
    dead_letter: str
    dead_letter_length: int
    groups: list[GroupView]
    lease: str | None = None  # the worker holding the partition's lease (ordering perUser)


@dataclass(frozen=True)
class QueueView:
    """One queue: its single stream (``partitions == 1``) or each of its partitions, in order."""

    name: str
    partitions: int
    detected: bool  # N was found from the keys, not given
    parts: list[StreamView]


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    streams: list[QueueView]
    reply_prefix: str
    reply_streams: int
    reply_count_complete: bool


async def observe(redis: RedisClient, settings: MonitorSettings) -> Snapshot:
    """Read everything shown in one refresh: per queue (all its partitions at once) two or three
    pipelined round trips per node, then the reply-stream SCAN."""
    queues = [await _observe_queue(redis, name, settings) for name in settings.stream]
    count, complete = await count_streams(redis, settings.reply_prefix, settings.scan_limit)
    return Snapshot(time.time(), queues, settings.reply_prefix, count, complete)


def _dead_letter(settings: MonitorSettings, stream: str) -> str:
    return settings.dead_letter_stream or wire.dead_letter_stream(stream)


async def _observe_queue(redis: RedisClient, name: str, settings: MonitorSettings) -> QueueView:
    partitions = settings.partitions
    detected = partitions is None
    if partitions is None:
        partitions = await detect_partitions(redis, name)
    keys = wire.partition_streams(name, partitions)
    parts = await _observe_streams(redis, keys, [_dead_letter(settings, key) for key in keys])
    return QueueView(name, partitions, detected, parts)


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


async def _observe_streams(redis: RedisClient, names: list[str], dead_letters: list[str]) -> list[StreamView]:
    """Every stream of a queue in one pipeline, then the consumers of all their groups in another."""
    pipe = redis.pipeline(transaction=False)
    for name, dead_letter in zip(names, dead_letters, strict=True):
        pipe.xinfo_stream(name)
        pipe.xinfo_groups(name)
        pipe.xlen(dead_letter)
        pipe.get(lease_key(name))
    replies = await pipe.execute(raise_on_error=False)
    views: list[StreamView] = []
    groups_of: list[tuple[str, list[dict[str, Any]]]] = []
    for i, (name, dead_letter) in enumerate(zip(names, dead_letters, strict=True)):
        info, groups, dead_length, lease = replies[4 * i : 4 * i + 4]
        if isinstance(dead_length, Exception):
            raise dead_length
        if isinstance(info, ResponseError) and "no such key" in str(info).lower():  # not used yet
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
    ]


def lease_key(partition_stream: str) -> str:
    """The worker's per-partition lease (``streamqueue.worker.leases.lease_key``), read-only here."""
    return f"{partition_stream}:lease"


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


def render(snapshot: Snapshot, source: str) -> str:
    """The text of one refresh; pure, so the layout is tested without a terminal."""
    stamp = datetime.fromtimestamp(snapshot.taken_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    replies = f"{snapshot.reply_streams}" + ("" if snapshot.reply_count_complete else "+ (scan limit)")
    lines = [
        f"streamqueue monitor  {source}  {stamp}",
        f"reply streams {snapshot.reply_prefix}*: {replies}",
        "",
    ]
    for queue in snapshot.streams:
        lines += _render_stream(queue.parts[0]) if queue.partitions == 1 else _render_partitioned(queue)
    return "\n".join(lines)


def _render_stream(stream: StreamView) -> list[str]:
    if not stream.exists:
        return [f"stream {stream.name}: does not exist yet (dead letters {stream.dead_letter_length})", ""]
    lines = _table(
        ["STREAM", "LENGTH", "ENTRIES-ADDED", "LAST-ID", "DEAD-LETTER", "DEAD"],
        [
            [
                stream.name,
                stream.length,
                stream.entries_added,
                stream.last_id,
                stream.dead_letter,
                stream.dead_letter_length,
            ]
        ],
    )
    if not stream.groups:
        return [*lines, "  (no consumer groups)", ""]
    for group in stream.groups:
        lines.append("")
        lines += _table(
            ["GROUP", "CONSUMERS", "PENDING", "LAG", "BACKLOG", "ENTRIES-READ", "LAST-DELIVERED"],
            [
                [
                    group.name,
                    group.consumers,
                    group.pending,
                    _or_unknown(group.lag),
                    group.backlog,
                    _or_unknown(group.entries_read),
                    group.last_delivered_id,
                ]
            ],
            indent="  ",
        )
        if group.members:
            lines += _table(
                ["CONSUMER", "PENDING", "IDLE", "INACTIVE"],
                [[c.name, c.pending, _seconds(c.idle_ms), _seconds(c.inactive_ms)] for c in group.members],
                indent="    ",
            )
    return [*lines, ""]


def _render_partitioned(queue: QueueView) -> list[str]:
    """A row per partition and the queue's total: the stream, each group, each group's consumers."""
    parts = queue.parts
    how = "detected from the keys" if queue.detected else "configured"
    missing = [p for p, part in enumerate(parts) if not part.exists]
    dead = {part.dead_letter: part.dead_letter_length for part in parts}  # one shared, or one each
    lines = [f"queue {queue.name}: {queue.partitions} partitions ({how})"]
    rows: list[list[object]] = [
        [p, part.name, part.length, part.entries_added, part.last_id, part.dead_letter,
         part.dead_letter_length, part.lease or "-"]
        for p, part in enumerate(parts)
    ]  # fmt: skip
    total_added = sum(part.entries_added for part in parts)
    rows.append(
        ["total", queue.name, sum(part.length for part in parts), total_added, "", "", sum(dead.values()), ""]
    )
    lines += _table(
        ["PARTITION", "STREAM", "LENGTH", "ENTRIES-ADDED", "LAST-ID", "DEAD-LETTER", "DEAD", "LEASE"], rows
    )
    if missing:
        lines.append(f"  partitions not created yet: {', '.join(map(str, missing))}")
    names = list(dict.fromkeys(g.name for part in parts for g in part.groups))
    if not names:
        return [*lines, "  (no consumer groups)", ""]
    for name in names:
        lines.append("")
        lines += _table(
            [
                "GROUP",
                "PARTITION",
                "CONSUMERS",
                "PENDING",
                "LAG",
                "BACKLOG",
                "ENTRIES-READ",
                "LAST-DELIVERED",
            ],
            _group_rows(name, parts),
            indent="  ",
        )
        members = [
            [c.name, p, c.pending, _seconds(c.idle_ms), _seconds(c.inactive_ms)]
            for p, part in enumerate(parts)
            for group in part.groups
            if group.name == name
            for c in group.members
        ]
        if members:
            lines += _table(["CONSUMER", "PARTITION", "PENDING", "IDLE", "INACTIVE"], members, indent="    ")
    return [*lines, ""]


def _group_rows(name: str, parts: list[StreamView]) -> list[list[object]]:
    """One row per partition and the total. A partition without the group (no worker has started on
    it yet) counts its whole stream as undelivered, as the operator does."""
    rows: list[list[object]] = []
    pending, lag, lag_known, reads, reads_known = 0, 0, True, 0, True
    consumers: set[str] = set()
    for p, part in enumerate(parts):
        group = next((g for g in part.groups if g.name == name), None)
        if group is None:
            rows.append([name, p, "-", "-", "no group", f"{part.length}", "-", "-"])
            lag += part.length
            continue
        rows.append(
            [name, p, group.consumers, group.pending, _or_unknown(group.lag), group.backlog,
             _or_unknown(group.entries_read), group.last_delivered_id]
        )  # fmt: skip
        consumers.update(c.name for c in group.members)
        pending += group.pending
        lag += group.lag or 0
        lag_known = lag_known and group.lag is not None
        reads += group.entries_read or 0
        reads_known = reads_known and group.entries_read is not None
    total_lag = f"{lag}" if lag_known else f">={lag}"
    total_backlog = f"{pending + lag}" if lag_known else f">={pending + lag}"
    total_reads = f"{reads}" if reads_known else f">={reads}"
    rows.append([name, "total", len(consumers), pending, total_lag, total_backlog, total_reads, ""])
    return rows


def _table(headers: list[str], rows: list[list[object]], indent: str = "") -> list[str]:
    cells = [headers, *[[str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        indent + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def _seconds(ms: int | None) -> str:
    return "-" if ms is None or ms < 0 else f"{ms / 1000:.1f}s"


def _or_unknown(value: int | None) -> str:
    return "unknown" if value is None else str(value)


async def _run(settings: MonitorSettings) -> int:
    redis = connect_any(settings.redis_connection())
    source = settings.safe_url()
    try:
        if settings.once:
            print(render(await observe(redis, settings), source))
            return 0
        while True:
            try:
                text = render(await observe(redis, settings), source)
            except RedisError as exc:  # keep watching through a Redis restart
                text = (
                    f"streamqueue monitor  {source}\nRedis error: {exc}; retrying every {settings.interval}s"
                )
            _show(text)
            await asyncio.sleep(settings.interval)
    finally:
        await redis.aclose()


def _show(text: str) -> None:
    """Redraw in place on a terminal; append snapshots when piped, so logs stay readable."""
    prefix = _CLEAR_SCREEN if sys.stdout.isatty() else "\n"
    sys.stdout.write(prefix + text + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    settings = CliApp.run(MonitorSettings, cli_args=sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(_run(settings))
    except KeyboardInterrupt:
        return 0
    except RedisError as exc:
        print(f"streamqueue-monitor: cannot read {settings.safe_url()}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
