"""Cancelled requests: which entries in flight were cancelled, learned without a call per entry.

A client cancels a request by adding ``<user_id>:<request_id>`` to the sorted set
``<stream>:cancelled`` and then publishing it on ``<stream>:cancel`` (``wire.cancel_key`` and
``wire.cancel_channel``; ``<stream>`` is the queue's base name, partitioned or not). A worker learns of
it in two ways, which together miss nothing:

- every read batch (new or reclaimed entries) is checked with one ZMSCORE for the batch's members,
  so an entry cancelled while it was queued is skipped when it is read;
- one Pub/Sub connection per worker receives the announcements and marks the matching entries in
  flight: one waiting for its turn is skipped when it comes, one whose handler runs has that
  handler's task cancelled (the handler sees ``CancelledError``).

An entry is tracked (``track``) before its batch is checked, so a cancel published while the check is
on the wire is not lost between the two. After the Pub/Sub connection is (re)established, everything
tracked is checked once more, for the cancels announced while it was down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from redis.asyncio.client import PubSub
from redis.exceptions import NoPermissionError, ResponseError

from .. import wire
from ..connection import CONNECTION_ERRORS, RedisClient, retry_transient

log = logging.getLogger("streamqueue.worker")

_RECANCEL_S = 0.1  # a handler still running this long after its cancel is cancelled again
_LISTEN_WAKEUP_S = 1.0  # get_message returns this often when nothing is published (no Redis call)
_CONFIRM_TIMEOUT_S = 10.0  # Redis answers a SUBSCRIBE at once; silence this long is a lost connection
_DENIED_LOG_EVERY_S = 60.0  # a refused subscription (an ACL without SUBSCRIBE) is logged this often


class Flight:
    """One entry taken from Redis, for as long as this worker holds it."""

    __slots__ = ("cancelled", "hits", "member", "task")

    def __init__(self, member: str) -> None:
        self.member = member
        self.cancelled = False
        self.task: asyncio.Task[object] | None = None  # set while its handler runs
        self.hits = 0  # cancellations of its handler's task on its account, not yet accounted for

    def cancel(self) -> None:
        self.cancelled = True
        if self.task is not None and not self.hits:
            self._hit(self.task)

    def _hit(self, task: asyncio.Task[object]) -> None:
        self.hits += 1
        task.cancel()
        asyncio.get_running_loop().call_later(_RECANCEL_S, self._check_landed, task)

    def _check_landed(self, task: asyncio.Task[object]) -> None:
        """A CancelledError can be lost inside a library (seen in redis-py when it lands during a
        command): a handler still running after a cancel is cancelled again."""
        if self.task is task:
            log.warning("cancel of %s: the handler is still running; cancelling it again", self.member)
            self._hit(task)


class CancelWatch:
    """The cancels of one queue, for every partition run of one worker."""

    def __init__(self, redis: RedisClient, stream: str) -> None:
        self.redis = redis
        self.key = wire.cancel_key(stream)
        self.channel = wire.cancel_channel(stream)
        self.subscribed = asyncio.Event()  # set while the Pub/Sub connection listens
        self._flights: dict[str, list[Flight]] = {}
        self._denied_logged_at: float | None = None  # when a refused subscription was last logged

    def track(self, user_id: str | None, request_id: str | None) -> Flight | None:
        """Start watching an entry; None for one that cannot be cancelled (no request_id)."""
        if request_id is None or wire.user_id_rejection(user_id) is not None:
            return None
        flight = Flight(wire.cancel_member(user_id or "", request_id))
        self._flights.setdefault(flight.member, []).append(flight)
        return flight

    def untrack(self, flight: Flight) -> None:
        flights = self._flights.get(flight.member)
        if flights is None:
            return
        if flight in flights:
            flights.remove(flight)
        if not flights:
            del self._flights[flight.member]

    async def check(self, flights: Iterable[Flight | None]) -> None:
        """One ZMSCORE for ``flights``: mark those already cancelled. A Redis failure only logs (the
        Pub/Sub announcement, or the next check, still catches a cancel)."""
        batch = [f for f in flights if f is not None]
        if not batch:
            return
        try:
            scores = await self.redis.zmscore(self.key, [f.member for f in batch])
        except (*CONNECTION_ERRORS, ResponseError) as exc:
            log.warning("could not check %d entries for cancels: %s", len(batch), exc)
            return
        for flight, score in zip(batch, scores, strict=True):
            if score is not None:
                flight.cancel()

    def announced(self, member: str) -> None:
        flights = self._flights.get(member, [])
        if flights:
            log.info("cancel of %s: %d entries in flight here", member, len(flights))
        for flight in list(flights):
            flight.cancel()

    async def run(self) -> None:
        """Listen on the cancel channel until cancelled; a lost subscription is taken again at once,
        then with backoff while that fails."""
        while True:
            pubsub = await retry_transient(self._subscribe, self._unsubscribed, retryable=_channel_lost)
            try:
                await self._listen(pubsub)
            except (*CONNECTION_ERRORS, ResponseError) as exc:
                log.warning("cancel channel %s: %s; subscribing again", self.channel, exc)
            finally:
                self.subscribed.clear()
                await pubsub.aclose()

    async def _subscribe(self) -> PubSub:
        """Subscribe, then check everything tracked for the cancels announced while unsubscribed.

        redis-py's ``subscribe`` only sends the command: Redis's answer is awaited here, so a refusal
        (NOPERM) fails this call, which ``retry_transient`` backs off, instead of the first read after
        it, which would subscribe again at once, in a hot loop."""
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            await _confirmed(pubsub)
            self.subscribed.set()
            self._denied_logged_at = None
            await self.check([f for flights in self._flights.values() for f in flights])
        except BaseException:
            self.subscribed.clear()
            await pubsub.aclose()
            raise
        return pubsub

    async def _listen(self, pubsub: PubSub) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=_LISTEN_WAKEUP_S)
            if message is not None and message.get("type") == "message":
                self.announced(str(message["data"]))

    def _unsubscribed(self, exc: Exception, delay: float) -> None:
        if not isinstance(exc, NoPermissionError):
            log.warning("cancel channel %s: %s; retrying in %.2fs", self.channel, exc, delay)
            return
        now = time.monotonic()
        if self._denied_logged_at is None or now - self._denied_logged_at >= _DENIED_LOG_EVERY_S:
            self._denied_logged_at = now
            log.error(
                "cancel channel %s: the Redis user may not SUBSCRIBE to it (its ACL needs +subscribe "
                "and &%s): %s; cancels of running requests are missed until it may; retrying",
                self.channel, self.channel, exc,
            )  # fmt: skip


async def _confirmed(pubsub: PubSub) -> None:
    """Wait for Redis's reply to the SUBSCRIBE just sent: raises its error (e.g. NOPERM)."""
    async with asyncio.timeout(_CONFIRM_TIMEOUT_S):
        while True:
            message = await pubsub.get_message(timeout=_CONFIRM_TIMEOUT_S)
            if message is not None and message.get("type") == "subscribe":
                return


def _channel_lost(exc: BaseException) -> bool:
    """Redis away or silent, or refusing the channel (e.g. an ACL without it): wait and subscribe again."""
    return isinstance(exc, (*CONNECTION_ERRORS, ResponseError, TimeoutError))
