"""``kubectl sq``'s human output: aligned tables and short sections (``-o json`` prints the data)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, as ``kubectl get`` prints them; ``-`` for None."""
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def age(seconds: float) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``: as kubectl shows an age."""
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "m" else 1):
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def status(data: dict[str, Any]) -> str:
    queue, redis = data["queue"], data["redis"]
    estimated = " (estimated)" if redis["lag_estimated"] else ""
    lines = [
        f"StreamQueue {queue['namespace']}/{queue['name']}: replicas {queue['replicas']} "
        f"(desired {queue['desired']}), backlog {redis['backlog']}{estimated}, "
        f"dead letters {redis['dead_letters']}",
        f"Paused: {queue['paused'] or 'no'}    Limit bound: {redis['limit_bound'] or 'no'}    "
        f"Operator leader: {_leader(data['leader'])}",
        "",
        table(
            ["PARTITION", "LENGTH", "BACKLOG", "PENDING", "LAG", "LEASE"],
            [
                [p["stream"], p["length"], p["backlog"], p["pending"], p["lag"], p["lease"]]
                for p in redis["partitions"]
            ],
        ),
        "",
        table(
            ["CONSUMER", "PARTITION", "PENDING", "IDLE"],
            [[c["name"], c["stream"], c["pending"], age(c["idle_ms"] / 1000)] for c in redis["consumers"]],
        )
        if redis["consumers"]
        else "No consumers.",
        "",
        table(
            ["LAST SEEN", "TYPE", "REASON", "MESSAGE"],
            [[e["time"], e["type"], e["reason"], e["message"]] for e in data["events"]],
        )
        if data["events"]
        else "No recent Events.",
    ]
    return "\n".join(lines)


def _leader(leader: dict[str, Any]) -> str:
    if "error" in leader:
        return f"unknown ({leader['error'].splitlines()[0]})"
    holders = [f"{lease['holder'] or 'none'} ({lease['lease']})" for lease in leader["leases"]]
    return ", ".join(holders) or "no streamqueue Lease found"


def dead_letters(letters: Sequence[dict[str, Any]]) -> str:
    if not letters:
        return "No dead letters."
    return table(
        ["ID", "STREAM", "REASON", "USER", "REQUEST", "DELIVERIES", "REDRIVES", "AGE", "ERROR"],
        [
            [d["id"], d["stream"], d["reason"], d["user_id"], d["request_id"], d["deliveries"], d["redrives"],
             age(d["age_seconds"]), _short(d["error"])]
            for d in letters
        ],
    )  # fmt: skip


def dead_letter(letter: dict[str, Any]) -> str:
    return (
        table(["FIELD", "VALUE"], sorted(letter["fields"].items()))
        + f"\n\nstream {letter['stream']}, id {letter['id']}"
    )


def dlq_result(command: str, data: dict[str, Any]) -> str:
    listed = dead_letters(data["dead_letters"])
    if command == "list":
        return listed
    if data.get("dry_run"):
        return f"{listed}\n\nDry run: would {command} {len(data['dead_letters'])} dead letter(s)."
    if command == "purge":
        return f"{listed}\n\nPurged {data['purged']} dead letter(s)."
    done = [r for r in data["redriven"] if r["new_id"]]
    gone = len(data["redriven"]) - len(done)
    moved = "\n".join(f"{r['id']} -> {r['stream']} {r['new_id']}" for r in done)
    return f"{moved}\n\nRedrove {len(done)} dead letter(s)" + (
        f"; {gone} were gone already (taken by another redrive or purge)." if gone else "."
    )


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
