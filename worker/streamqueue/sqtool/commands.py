"""The sqtool commands: each reads or changes the queue in Redis and returns a JSON-able result."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .. import deadletters, wire
from ..connection import RedisClient
from ..monitor.reads import observe_queue
from ..settings import WorkerSettings
from .args import dead_letter_filter, has_filter


async def status(redis: RedisClient, settings: WorkerSettings) -> dict[str, Any]:
    """Backlog per partition, the group's consumers, leases, the limit bound and dead-letter counts."""
    queue = await observe_queue(redis, settings.stream, settings.partitions, settings.dead_letter_stream)
    total = queue.totals.get(settings.group)
    per_partition = dict(total.partitions) if total and total.partitions else {}
    partitions, consumers = [], []
    for part in queue.parts:
        group = next((g for g in part.groups if g.name == settings.group), None)
        backlog = per_partition.get(part.name, total.backlog if total else part.length)
        partitions.append({
            "stream": part.name, "length": part.length, "backlog": backlog,
            "pending": group.pending if group else 0, "lag": group.lag if group else None,
            "group_exists": group is not None, "lease": part.lease,
        })  # fmt: skip
        consumers += [
            {"stream": part.name, "name": c.name, "pending": c.pending, "idle_ms": c.idle_ms}
            for c in (group.members if group else [])
        ]
    dead = await deadletters.counts(redis, deadletters.dead_letter_streams(settings))
    return {
        "stream": settings.stream,
        "group": settings.group,
        "backlog": total.backlog if total else sum(p["backlog"] for p in partitions),
        "lag_estimated": bool(total and total.lag_estimated),
        "partitions": partitions,
        "consumers": consumers,
        "limit_bound": await redis.get(wire.limit_bound_key(settings.stream)),
        "dead_letters": sum(dead.values()),
        "dead_letter_streams": dead,
    }


async def dlq(redis: RedisClient, settings: WorkerSettings, args: argparse.Namespace) -> dict[str, Any]:
    streams = deadletters.dead_letter_streams(settings)
    now = time.time()
    if args.dlq_command == "show":
        letter = await deadletters.get(redis, streams, args.entry_id)
        if letter is None:
            raise LookupError(f"no dead letter {args.entry_id} in {', '.join(streams)}")
        return {"dead_letter": letter.to_json(now)}
    if args.dlq_command != "list" and not (has_filter(args) or args.all):
        raise ValueError(f"dlq {args.dlq_command} acts on every dead letter without a filter: add --all")
    letters = await _selected(redis, streams, args)
    result: dict[str, Any] = {"dead_letters": [letter.to_json(now) for letter in letters]}
    if args.dlq_command == "list" or args.dry_run:
        return result | {"dry_run": args.dlq_command != "list"}
    if args.dlq_command == "purge":
        return result | {"purged": await deadletters.purge(redis, letters)}
    redriven = []
    for letter in letters:
        target = deadletters.target_stream(settings, letter)
        new_id = await deadletters.redrive(redis, letter, target)
        redriven.append({"id": letter.entry_id, "stream": target, "new_id": new_id})
    return result | {"redriven": redriven}


async def _selected(
    redis: RedisClient, streams: list[str], args: argparse.Namespace
) -> list[deadletters.DeadLetter]:
    where = dead_letter_filter(args)
    if not args.ids:
        return await deadletters.find(redis, streams, where, limit=args.limit)
    now = time.time()
    found = [await deadletters.get(redis, streams, entry_id) for entry_id in args.ids]
    return [letter for letter in found if letter is not None and where.matches(letter, now)][: args.limit]
