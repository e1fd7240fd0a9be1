"""Leader election on a ``coordination.k8s.io/v1`` Lease, the way client-go's leaderelection does it.

Every replica runs the same watches; only the Lease holder writes. A replica tries to acquire or
renew every ``retry_period``. A standby takes the Lease once it has seen the same record unchanged
for the record's ``leaseDurationSeconds`` (measured on its own clock from when it saw the record,
so clock skew between nodes does not matter). The leader fences itself: it counts as leader only
until ``renew_deadline`` after the start of its last successful renewal, which is before any
standby can see the Lease expire (``renew_deadline < lease_duration``). ``Lease.leading()`` is
what every write checks, right before it is sent (``kubeapi.Cluster``), so a paused or partitioned
leader stops writing on its own clock, without needing to hear from the API server.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.rest import ApiException

from . import metrics
from .kubeapi import API_ERRORS, Cluster

log = logging.getLogger("streamqueue.leader")
Clock = Callable[[], float]
JITTER = 1.2  # a standby retries every retry_period * [1, 1.2), as client-go does


@dataclass(frozen=True)
class Timing:
    lease_duration: float
    renew_deadline: float
    retry_period: float


@dataclass(frozen=True)
class Record:
    """The Lease's spec as the election reads and writes it."""

    holder: str
    duration_seconds: int
    acquire_time: str | None
    renew_time: str | None
    transitions: int

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Record:
        return cls(
            holder=spec.get("holderIdentity") or "",
            duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
        )

    def to_spec(self) -> dict[str, Any]:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration_seconds,
            "acquireTime": self.acquire_time,
            "renewTime": self.renew_time,
            "leaseTransitions": self.transitions,
        }


def micro_time(at: float) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds)."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Election:
    """The pure part of the election: what this replica knows, decided on an injected clock."""

    def __init__(self, identity: str, timing: Timing, clock: Clock = time.monotonic) -> None:
        self.identity, self.timing, self.clock = identity, timing, clock
        self.renewed_at: float | None = None  # start of the last successful acquire/renew
        self._observed: tuple[Record, float] | None = None

    def leading(self) -> bool:
        """True until ``renew_deadline`` after the last successful renewal started: the fence."""
        return self.renewed_at is not None and self.clock() - self.renewed_at < self.timing.renew_deadline

    def fence_remaining(self) -> float:
        """Seconds this replica may still write (0 when it is not the leader)."""
        if self.renewed_at is None:
            return 0.0
        return max(0.0, self.renewed_at + self.timing.renew_deadline - self.clock())

    def observe(self, record: Record) -> None:
        """Remember when the record last changed: expiry counts from then, on our own clock."""
        if self._observed is None or self._observed[0] != record:
            self._observed = (record, self.clock())

    def may_take(self, record: Record) -> bool:
        """Ours already, released, or unchanged for its whole lease duration since we first saw it."""
        if record.holder in ("", self.identity):
            return True
        assert self._observed is not None and self._observed[0] == record, "observe() the record first"
        return self.clock() >= self._observed[1] + record.duration_seconds

    def next_record(self, record: Record | None, wall: float) -> Record:
        """The record we write to acquire or renew: a new holder counts one more transition."""
        now = micro_time(wall)
        duration = int(-(-self.timing.lease_duration // 1))  # whole seconds, rounded up
        if record is not None and record.holder == self.identity:
            return replace(record, duration_seconds=duration, renew_time=now)
        transitions = 0 if record is None else record.transitions + (1 if record.holder else 0)
        return Record(self.identity, duration, now, now, transitions)

    def renewed(self, attempt_started: float, record: Record) -> None:
        self.renewed_at = attempt_started
        self._observed = (record, attempt_started)

    def lost(self) -> None:
        self.renewed_at = None

    def pause(self, rand: float) -> float:
        """Seconds until the next attempt: retry_period, jittered for a standby; a leader never
        sleeps past the moment its fence closes."""
        if self.leading():
            return min(self.timing.retry_period, self.fence_remaining())
        return self.timing.retry_period * (1 + (JITTER - 1) * rand)


class Lease:
    """One replica's elector: acquires, renews and releases the Lease; reports each change."""

    def __init__(self, cluster: Cluster, namespace: str, name: str, identity: str, timing: Timing) -> None:
        self.cluster, self.namespace, self.name = cluster, namespace, name
        self.election = Election(identity, timing)
        self.identity = identity
        self._leading_now = asyncio.Event()
        self._was_leading = False
        self._uid: str | None = None
        self._task: asyncio.Task[None] | None = None
        metrics.LEADER.set(0)

    def leading(self) -> bool:
        return self.election.leading()

    async def wait_until_leading(self) -> None:
        """Until this replica leads by the clock (the event may still say so after the fence closed)."""
        while not self.leading():
            self._leading_now.clear()
            await self._leading_now.wait()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="leader-election")

    async def _run(self) -> None:
        log.info("leader election: %s on Lease %s/%s", self.identity, self.namespace, self.name)
        while True:
            await self._attempt()
            await self._publish()
            await asyncio.sleep(self.election.pause(random.random()))

    async def _attempt(self) -> None:
        started = self.election.clock()
        try:
            await self._try_acquire_or_renew(started)
        except (*API_ERRORS, OSError) as exc:
            log.warning("Lease %s/%s not renewed: %s", self.namespace, self.name, exc)

    async def _try_acquire_or_renew(self, started: float) -> None:
        timeout = self.election.timing.renew_deadline
        lease = await self.cluster.read_lease(self.namespace, self.name, timeout)
        if lease is None:
            record = self.election.next_record(None, time.time())
            lease = await self.cluster.create_lease(self.namespace, self.name, record.to_spec(), timeout)
            self._took(started, record, lease)
            return
        current = Record.from_spec(lease.get("spec") or {})
        self.election.observe(current)
        if not self.election.may_take(current):
            if current.holder != self.identity:
                self.election.lost()
            return
        record = self.election.next_record(current, time.time())
        lease["spec"] = record.to_spec()
        try:
            lease = await self.cluster.replace_lease(self.namespace, self.name, lease, timeout)
        except ApiException as exc:
            if exc.status != 409:  # 409: another replica wrote first; read again next time
                raise
            return
        self._took(started, record, lease)

    def _took(self, started: float, record: Record, lease: dict[str, Any]) -> None:
        self.election.renewed(started, record)
        self._uid = lease["metadata"]["uid"]

    async def _publish(self) -> None:
        """Wake the waiters while leading; gauge, log and Event on each change of leadership."""
        leading = self.leading()
        if leading:
            self._leading_now.set()
        if leading == self._was_leading:
            return
        self._was_leading = leading
        metrics.LEADER.set(1 if leading else 0)
        if leading:
            log.info("%s became leader (Lease %s/%s)", self.identity, self.namespace, self.name)
            await self._event(f"{self.identity} became leader")
        else:
            self._leading_now.clear()
            # No Event: a replica past its fence writes nothing; the next leader's Event says it.
            log.warning("%s stopped leading: Lease not renewed within the renew deadline", self.identity)

    async def _event(self, message: str) -> None:
        """An Event on the Lease, as client-go's resource lock records it (reason LeaderElection)."""
        try:
            await self.cluster.lease_event(self.namespace, self.name, self._uid, message)
        except API_ERRORS as exc:
            log.warning("leader election Event not posted: %s", exc)

    async def stop(self) -> None:
        """Stop campaigning; a leader closes its fence first, then hands the Lease over at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if not self.leading():
            return
        self.election.lost()
        self._leading_now.clear()
        metrics.LEADER.set(0)
        released = Record("", 1, None, micro_time(time.time()), 0)
        try:
            lease = await self.cluster.read_lease(
                self.namespace, self.name, self.election.timing.renew_deadline
            )
            if lease is None or Record.from_spec(lease["spec"]).holder != self.identity:
                return
            lease["spec"] = {**released.to_spec(), "leaseTransitions": lease["spec"].get("leaseTransitions")}
            await self.cluster.replace_lease(
                self.namespace, self.name, lease, self.election.timing.renew_deadline
            )
        except API_ERRORS as exc:
            log.warning("Lease not released (the next leader waits for it to expire): %s", exc)
            return
        log.info("%s released the Lease", self.identity)
        await self._event(f"{self.identity} stopped leading (released the Lease)")
