"""A queue's dead letters: read them (filtered by reason, user, age), put them back into the queue
(redrive) or delete them (purge).

The worker writes them (``worker/retry.py``): the original entry plus ``dl_*`` fields saying why,
after how many deliveries, from which stream. A redrive XADDs the original fields to the partition
the user's messages go to, with ``redrives`` counting how often that entry came back, so it starts
over with a delivery count of 1 and keeps its ``user_id`` and ``request_id``.

A redrive never loses a dead letter, and concurrent redrives send each once. Where Redis can run it
all in one script (a single server, or a cluster whose two keys share a slot: the default
per-partition dead-letter stream ``<stream>:{p}:dead`` shares its partition's) the script deletes
the dead letter and adds it only if its XDEL removed it (Redis answers 1 to exactly one caller).
Across slots (a cluster; a single-partition queue's ``<stream>:dead`` or a configured
``deadLetterStream``) no script can span both keys, so a redrive claims the letter first, adds it,
then deletes it: the claim (``wire.redrive_claim_key``, SET NX PX, set by one script in the
dead-letter stream's slot only while the letter is still there) keeps a concurrent redrive away,
and the letter is deleted only once it is in the queue. A crash between the add and the delete
leaves the letter in place; once its claim expires (``CLAIM_MS``) a redrive sends it again, a
duplicate with the same ``request_id`` (which clients dedupe), as the worker's own crash recovery
would: never a lost message.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.crc import key_slot

from . import wire
from .connection import RedisClient
from .settings import WorkerSettings

_PAGE = 500  # entries per XRANGE while scanning a dead-letter stream
# How long a redrive across slots holds its claim on a dead letter: far longer than its XADD takes,
# short enough that a letter whose redrive died midway can be sent again a minute later.
CLAIM_MS = 60_000
# KEYS[1] the dead-letter stream, KEYS[2] the queue's stream; ARGV[1] the dead letter's id, then the
# fields to add. Nothing is added unless this call removed the dead letter.
_REDRIVE_SCRIPT = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return false end
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
"""
# Across slots. KEYS[1] the dead-letter stream, KEYS[2] the letter's claim (same slot); ARGV[1] the
# letter's id, ARGV[2] the claim's lifetime (ms). 1: claimed; 0: gone, or claimed by another redrive.
_CLAIM_SCRIPT = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return 0 end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
# Same keys; ARGV[1] the letter's id: it is in the queue now, so it and its claim go.
_SETTLE_SCRIPT = """
redis.call('XDEL', KEYS[1], ARGV[1])
return redis.call('DEL', KEYS[2])
"""


@dataclass(frozen=True)
class DeadLetter:
    """One dead-letter entry: where it is stored, its id and every field as written."""

    stream: str
    entry_id: str
    fields: Mapping[str, str]

    @property
    def reason(self) -> str:
        return self.fields.get(wire.DL_REASON, "")

    @property
    def user_id(self) -> str | None:
        return self.fields.get(wire.USER_ID)

    @property
    def at(self) -> float:
        """When it was dead-lettered (epoch seconds); the entry id's time if the field is missing."""
        return float(self.fields.get(wire.DL_AT) or wire.parse_entry_id(self.entry_id)[0] / 1000)

    @property
    def redrives(self) -> int:
        return int(self.fields.get(wire.REDRIVES) or 0)

    @property
    def dead_lettered(self) -> int:
        """How often this message has been dead-lettered: once, plus once per redrive before."""
        return self.redrives + 1

    def original(self) -> dict[str, str]:
        """The entry as the producer wrote it (its ``redrives`` count included), without ``dl_*``."""
        return {k: v for k, v in self.fields.items() if not k.startswith("dl_")}

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "id": self.entry_id,
            "reason": self.reason,
            "error": self.fields.get(wire.DL_ERROR, ""),
            "deliveries": int(self.fields.get(wire.DL_DELIVERIES) or 0),
            "user_id": self.user_id,
            "request_id": self.fields.get(wire.REQUEST_ID),
            "redrives": self.redrives,
            "dead_lettered": self.dead_lettered,
            "age_seconds": round(max(0.0, now - self.at), 3),
            "source_stream": self.fields.get(wire.DL_SOURCE_STREAM),
            "source_id": self.fields.get(wire.DL_SOURCE_ID),
            "fields": dict(self.fields),
        }


@dataclass(frozen=True)
class Filter:
    """Which dead letters a command acts on; every criterion given must hold (none: all of them)."""

    reason: str | None = None
    user: str | None = None
    older_than: float | None = None  # seconds since it was dead-lettered
    newer_than: float | None = None

    def matches(self, letter: DeadLetter, now: float) -> bool:
        age = now - letter.at
        return (
            (self.reason is None or letter.reason == self.reason)
            and (self.user is None or letter.user_id == self.user)
            and (self.older_than is None or age >= self.older_than)
            and (self.newer_than is None or age <= self.newer_than)
        )


def dead_letter_streams(settings: WorkerSettings) -> list[str]:
    """The queue's dead-letter streams: the configured one, else one per partition."""
    if settings.dead_letter_stream:
        return [settings.dead_letter_stream]
    return [settings.dead_letter(p) for p in settings.partition_streams]


async def counts(redis: RedisClient, streams: Iterable[str]) -> dict[str, int]:
    """XLEN of each dead-letter stream."""
    return {stream: int(await redis.xlen(stream)) for stream in streams}


async def find(
    redis: RedisClient, streams: Iterable[str], where: Filter, *, limit: int | None = None
) -> list[DeadLetter]:
    """The matching dead letters, oldest first per stream, at most ``limit`` (None: all)."""
    now = time.time()
    found: list[DeadLetter] = []
    for stream in streams:
        async for letter in _scan(redis, stream):
            if where.matches(letter, now):
                found.append(letter)
                if limit is not None and len(found) >= limit:
                    return found
    return found


async def get(redis: RedisClient, streams: Iterable[str], entry_id: str) -> DeadLetter | None:
    """The dead letter with this id in any of ``streams``."""
    for stream in streams:
        found: Any = await redis.xrange(stream, entry_id, entry_id)  # decoded: [(id, {field: value})]
        for found_id, fields in found:
            return DeadLetter(stream, found_id, fields)
    return None


async def _scan(redis: RedisClient, stream: str) -> AsyncIterator[DeadLetter]:
    start = "-"
    while True:
        page: Any = await redis.xrange(stream, start, "+", count=_PAGE)
        for entry_id, fields in page:
            yield DeadLetter(stream, entry_id, fields)
        if len(page) < _PAGE:
            return
        start = "(" + page[-1][0]


def target_stream(settings: WorkerSettings, letter: DeadLetter) -> str:
    """The partition the letter's user's messages go to now (as the client routes them)."""
    return settings.partition_streams[wire.partition_of(letter.user_id or "", settings.partitions)]


def redrive_fields(letter: DeadLetter) -> dict[str, str]:
    """The original fields with the redrive counted."""
    return {**letter.original(), wire.REDRIVES: str(letter.redrives + 1)}


async def redrive(redis: RedisClient, letter: DeadLetter, target: str) -> str | None:
    """Move one dead letter to ``target``; its new entry id, or None if it was gone (taken by a
    concurrent redrive or purge, or trimmed) or, across slots, claimed by a redrive in progress."""
    fields = redrive_fields(letter)
    if not _one_script_can_do_it(redis, letter.stream, target):
        return await _redrive_across_slots(redis, letter, target, fields)
    args = [letter.entry_id, *(part for item in fields.items() for part in item)]
    added = await redis.eval(_REDRIVE_SCRIPT, 2, letter.stream, target, *args)
    return str(added) if added else None


async def _redrive_across_slots(
    redis: RedisClient, letter: DeadLetter, target: str, fields: dict[str, str]
) -> str | None:
    """Claim, add, delete (see the module's docstring): a crash after the add duplicates, never loses."""
    claim = wire.redrive_claim_key(letter.stream, letter.entry_id)
    if not await redis.eval(_CLAIM_SCRIPT, 2, letter.stream, claim, letter.entry_id, CLAIM_MS):
        return None
    added = str(await redis.xadd(target, fields))  # type: ignore[arg-type]
    await _settle(redis, letter, claim)
    return added


async def _settle(redis: RedisClient, letter: DeadLetter, claim: str) -> None:
    """Delete the redriven letter and its claim (until this runs, a crash leaves the letter redrivable)."""
    await redis.eval(_SETTLE_SCRIPT, 2, letter.stream, claim, letter.entry_id)


def _one_script_can_do_it(redis: RedisClient, first: str, second: str) -> bool:
    if not isinstance(redis, aioredis.RedisCluster):
        return True
    return key_slot(first.encode()) == key_slot(second.encode())


async def purge(redis: RedisClient, letters: Iterable[DeadLetter]) -> int:
    """Delete the dead letters; how many were still there."""
    by_stream: dict[str, list[str]] = {}
    for letter in letters:
        by_stream.setdefault(letter.stream, []).append(letter.entry_id)
    return sum([int(await redis.xdel(stream, *ids)) for stream, ids in by_stream.items()])
