"""What one refresh saw, as plain values: the reads build them, the renderer lays them out."""

from __future__ import annotations

from dataclasses import dataclass

from .. import wire
from ..observation import Observation


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
    # Each group over every partition, counted as the operator counts it (``observation.combine``).
    totals: dict[str, Observation]


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    streams: list[QueueView]
    reply_prefix: str
    reply_streams: int
    reply_count_complete: bool
