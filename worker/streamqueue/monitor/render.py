"""The text of one refresh: pure, so the layout is tested without a terminal."""

from __future__ import annotations

from datetime import UTC, datetime

from ..observation import Observation
from .views import QueueView, Snapshot, StreamView


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
            _group_rows(name, parts, queue.totals[name]),
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


def _group_rows(name: str, parts: list[StreamView], total: Observation) -> list[list[object]]:
    """One row per partition as Redis reports it, and the total as the operator counts it (``total``,
    from ``observation.combine``): a partition without the group (no worker has started on it yet)
    counts its whole stream as undelivered, a lag Redis cannot tell is estimated from above ("<=")."""
    rows: list[list[object]] = []
    reads = 0  # entries read where Redis knows it: the total's lower bound when some partition does not
    consumers: set[str] = set()
    for p, part in enumerate(parts):
        group = next((g for g in part.groups if g.name == name), None)
        if group is None:
            rows.append([name, p, "-", "-", "no group", f"{part.length}", "-", "-"])
            continue
        rows.append(
            [name, p, group.consumers, group.pending, _or_unknown(group.lag), group.backlog,
             _or_unknown(group.entries_read), group.last_delivered_id]
        )  # fmt: skip
        consumers.update(c.name for c in group.members)
        reads += group.entries_read or 0
    bound = "<=" if total.lag_estimated else ""
    total_reads = f">={reads}" if total.entries_read is None else f"{total.entries_read}"
    rows.append(
        [
            name,
            "total",
            len(consumers),
            total.pending,
            f"{bound}{total.lag}",
            f"{bound}{total.backlog}",
            total_reads,
            "",
        ]
    )
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
