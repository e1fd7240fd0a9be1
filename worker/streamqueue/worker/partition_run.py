"""One partition's run: its parts wired together, started, and drained when its stop is set.

Four tasks run, five with per-user fairness; they share the worker's Redis client (each blocking
read holds its own pooled connection): the intake (``intake.Intake.run``: XREADGROUP ``>`` or the
fair queue in batches sized to the free in-flight slots, and XAUTOCLAIM of entries idle past the
claim time), the claim renewer (keeps long handlers' entries from looking idle), the outbox flusher
(reply XADDs, their streams' lifetime and the XACK: ``commit``) and, with fairness, the fair
queue's intake. Entries run concurrently on a ``ConsumerPool`` (no task per entry: ``entry``
processes each); the in-flight limit (``InFlight``) is this partition's share of the worker's (a
shared pool would let a partition blocked on an empty read hold slots that a busy one needs). With
per-user order a ``UserOrder`` gate holds a user's next entry until the previous one is committed,
and a failed entry is retried in place (``retry``). Setting ``stop`` starts the ``drain``: reading
stops, in-flight entries get the grace period, whatever is still unfinished is handed back to the
group, and ``until_stopped`` returns.
"""

from __future__ import annotations

import asyncio
import logging

from ..aio import CANCEL_PATIENCE_S, cancel
from ..connection import RedisClient
from ..handlers import Handler
from ..metrics import WorkerMetrics
from ..settings import WorkerSettings
from . import drain
from .cancel import CancelWatch
from .chunks import ChunkWriter
from .commit import Commits
from .consumers import ConsumerPool
from .entry import EntryProcessor
from .inflight import InFlight
from .intake import Intake
from .outbox import Outbox
from .reclaim import Delivery
from .retry import Failures, Retries
from .userorder import UserOrder

log = logging.getLogger("streamqueue.worker")


class PartitionRun:
    """One partition stream consumed by this worker: its tasks and in-flight entries."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: RedisClient,
        handler: Handler,
        metrics: WorkerMetrics,
        *,
        stream: str,
        concurrency: int,
        takeover: bool = False,
        cancels: CancelWatch | None = None,
    ) -> None:
        """``takeover``: this worker just got the partition's lease, so everything pending in it
        belongs to a previous holder that is gone; the first reclaim scan takes it all, in order,
        before any new entry is read. ``cancels``: the worker's watch of cancelled requests (None:
        requests cannot be cancelled)."""
        s = settings
        self.s = s
        self.stream = stream
        self.stop = asyncio.Event()
        self.inflight = InFlight(concurrency, cancels)
        self.order = UserOrder() if s.ordering == "perUser" else None
        self.consumers: ConsumerPool[Delivery] = ConsumerPool(self._entry, "streamqueue-consumer")
        self.outbox = Outbox(redis, stream, s.group, metrics, chunk_flush_s=s.chunk_flush_ms / 1000)
        self.intake = Intake(
            s, redis, metrics, stream=stream, inflight=self.inflight, start=self._start, takeover=takeover
        )
        self.commits = Commits(self.outbox, self.inflight, self.order, self.consumers.submit)
        self.retries = Retries(
            self.commits, self.consumers.submit, self.stop, in_place=self.order is not None
        )
        failures = Failures(s, metrics, stream=stream)
        self.processor = EntryProcessor(
            s, handler, metrics, stream=stream, chunks=ChunkWriter(self.outbox), inflight=self.inflight,
            failures=failures,
        )  # fmt: skip

    @property
    def ready(self) -> bool:
        """The group exists and Redis answered the last read."""
        return self.intake.ready

    async def until_stopped(self) -> None:
        """Consume until ``stop`` is set (then drain) or a task fails (then drain, and raise)."""
        stop = self.stop
        intake = asyncio.create_task(self.intake.run(stop), name="streamqueue-intake")
        background = [
            asyncio.create_task(self.outbox.run(), name="streamqueue-outbox"),
            asyncio.create_task(self.intake.renew_claims(), name="streamqueue-renew"),
        ]
        fair = None
        if self.intake.fair is not None:
            fair = asyncio.create_task(self.intake.fair.run_intake(stop), name="streamqueue-fair-intake")
            background.append(fair)
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, intake, *background], return_when=asyncio.FIRST_COMPLETED)
        crashed = next((t for t in done if t is not stopper), None)
        stopper.cancel()
        log.info("%s: draining %d in-flight entries", self.stream, len(self.inflight))
        s = self.s
        await drain.stop_intake(
            intake, reading=self.intake.reading, block_ms=s.block_ms, grace_s=s.shutdown_grace_seconds
        )
        if fair is not None:  # it ends by itself once its blocking read returns
            await asyncio.wait([fair], timeout=s.block_ms / 1000 + CANCEL_PATIENCE_S)
        await drain.finish_in_flight(
            self.inflight, self.consumers, self.outbox, grace_s=s.shutdown_grace_seconds
        )
        await drain.hand_back(self.intake.pending, stream=self.stream, group=s.group)
        await cancel(*background)
        self.retries.cancel()
        if crashed is not None and not crashed.cancelled() and crashed.exception() is not None:
            raise RuntimeError(f"worker task {crashed.get_name()} failed") from crashed.exception()

    def _start(self, entry: Delivery) -> None:
        """Queue one entry on the consumer pool; the intake has taken its slot.

        The slot (and the entry's place in flight, which keeps its claim renewed) is given back when
        the entry is committed, or at once if it ends without a commit (handler failure). With
        per-user order an entry whose user has one in flight waits, holding its slot, for its turn.
        """
        self.inflight.add(entry)
        if self.order is None or self.order.admit(entry):
            self.consumers.submit(entry)

    async def _entry(self, entry: Delivery) -> None:
        """One entry on a consumer of the pool: processed, then committed or left to ``retries``."""
        handed_over = False
        try:
            commit = await self.processor.process(entry)
            if commit is not None:
                self.commits.submit(entry, commit)
                handed_over = True
        except Exception:
            log.exception("entry %s: unexpected error; it stays pending", entry.entry_id)
        finally:
            if not handed_over:
                self.retries.not_committed(entry)
