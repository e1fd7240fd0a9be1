"""``streamqueue-monitor``: a live terminal view of a queue's streams, groups, consumers and backlog.

What the article's ``stream_info.py`` showed, for any queue: the names come from flags or the same
``STREAMQUEUE_*`` environment variables the worker reads, and reply streams are counted with a bounded
SCAN of the reply prefix instead of a hard-coded user list.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import redis.asyncio as aioredis
from pydantic import Field, field_validator
from pydantic_settings import CliApp, NoDecode, SettingsConfigDict
from redis.exceptions import RedisError, ResponseError

from . import wire
from .connection import RedisSettings, connect

_CLEAR_SCREEN = "\x1b[H\x1b[2J"
_SCAN_BATCH = 1000


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


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    streams: list[StreamView]
    reply_prefix: str
    reply_streams: int
    reply_count_complete: bool


async def observe(redis: aioredis.Redis, settings: MonitorSettings) -> Snapshot:
    """Read everything shown in one refresh: per stream two round trips, then the reply-stream SCAN."""
    streams = [await _observe_stream(redis, name, _dead_letter(settings, name)) for name in settings.stream]
    count, complete = await count_streams(redis, settings.reply_prefix, settings.scan_limit)
    return Snapshot(time.time(), streams, settings.reply_prefix, count, complete)


def _dead_letter(settings: MonitorSettings, stream: str) -> str:
    return settings.dead_letter_stream or wire.dead_letter_stream(stream)


async def _observe_stream(redis: aioredis.Redis, name: str, dead_letter: str) -> StreamView:
    pipe = redis.pipeline(transaction=False)
    pipe.xinfo_stream(name)
    pipe.xinfo_groups(name)
    pipe.xlen(dead_letter)
    info, groups, dead_length = await pipe.execute(raise_on_error=False)
    if isinstance(info, ResponseError) and "no such key" in str(info).lower():  # not used yet
        return StreamView(name, False, 0, 0, "-", dead_letter, int(dead_length), [])
    for result in (info, groups, dead_length):
        if isinstance(result, Exception):
            raise result
    consumers = await _observe_consumers(redis, name, [g["name"] for g in groups])
    return StreamView(
        name=name,
        exists=True,
        length=info["length"],
        entries_added=info.get("entries-added", 0),
        last_id=info["last-generated-id"],
        dead_letter=dead_letter,
        dead_letter_length=dead_length,
        groups=[_group_view(g, consumers[g["name"]]) for g in groups],
    )


async def _observe_consumers(
    redis: aioredis.Redis, stream: str, groups: list[str]
) -> dict[str, list[ConsumerView]]:
    pipe = redis.pipeline(transaction=False)
    for group in groups:
        pipe.xinfo_consumers(stream, group)
    results = await pipe.execute() if groups else []
    return {
        group: [ConsumerView(c["name"], c["pending"], c["idle"], c.get("inactive")) for c in consumers]
        for group, consumers in zip(groups, results, strict=True)
    }


def _group_view(info: dict[str, object], consumers: list[ConsumerView]) -> GroupView:
    return GroupView(**vars(wire.GroupInfo.from_reply(info)), members=consumers)


async def count_streams(redis: aioredis.Redis, prefix: str, scan_limit: int) -> tuple[int, bool]:
    """Count stream keys starting with ``prefix``; stops after ``scan_limit`` keys have been scanned.

    Returns (count, complete). SCAN walks the whole keyspace, so the limit keeps one refresh cheap on
    a Redis with millions of keys; the view then shows the count as a lower bound.
    """
    pattern = _glob_escape(prefix) + "*"
    cursor, count, scanned = 0, 0, 0
    while True:
        cursor, keys = await redis.scan(cursor, match=pattern, count=_SCAN_BATCH, _type="stream")
        count += len(keys)
        scanned += _SCAN_BATCH
        if cursor == 0:
            return count, True
        if scanned >= scan_limit:
            return count, False


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
    for stream in snapshot.streams:
        lines += _render_stream(stream)
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
    redis = connect(settings.redis_connection())
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
