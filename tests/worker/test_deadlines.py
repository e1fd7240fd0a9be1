"""Request deadlines: the queue's maxQueueAgeSeconds and the request's own ``deadline`` field.

The rules are unit-tested (``expiry.expired_reason``, ``wire.deadline_rejection``, the client's
conversion); the behaviour runs on a real redis-server with real in-process Workers and a handler
that records its calls: expired requests get an ``expired`` reply, are acknowledged, counted, and never
reach the handler, also when they expire while pending (reclaimed, or retried in place); the others
are answered.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from streamqueue import Client, wire
from streamqueue.client import RequestExpired
from streamqueue.client.api import _deadline_ms
from streamqueue.handlers import Message
from streamqueue.worker.expiry import expired_reason
from streamqueue_harness.eventually import eventually_async

from tests.worker.conftest import STREAM, group_settled, replies, send

NOW_MS = 1_800_000_000_000


class Recorder:
    """Echoes, recording each call's message; ``"fail"`` raises once its request's deadline has passed
    (a model call that outlives the deadline, then fails)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, msg: Message) -> str:
        self.calls.append(msg.message)
        if msg.message == "fail":
            await asyncio.sleep(max(0.0, int(msg.fields[wire.DEADLINE]) / 1000 - time.time()) + 0.01)
            raise RuntimeError("the model failed after the deadline")
        return f"echo: {msg.message}"


def expired_total(worker, reason: str) -> float | None:
    return worker.metrics.registry.get_sample_value("streamqueue_messages_expired_total", {"reason": reason})


def xadd_aged(r, user_id: str, message: str, request_id: str, age_ms: int) -> str:
    """An entry Redis would have added ``age_ms`` ago: its id carries that time, as XADD * sets it."""
    entry_id = f"{int(time.time() * 1000) - age_ms}-0"
    return r.xadd(
        STREAM, {wire.USER_ID: user_id, wire.MESSAGE: message, wire.REQUEST_ID: request_id}, id=entry_id
    )


# -- the rules ------------------------------------------------------------------------------------


@given(age=st.integers(0, 10**9), max_age=st.integers(1, 10**9))
def test_queue_age_is_now_minus_the_entry_id_time(age: int, max_age: int) -> None:
    reason = expired_reason(f"{NOW_MS - age}-7", {}, max_age, NOW_MS)
    assert reason == (wire.EXPIRED_QUEUE_AGE if age > max_age else None)


@given(offset=st.integers(-(10**9), 10**9))
def test_a_deadline_passes_after_its_millisecond(offset: int) -> None:
    fields = {wire.DEADLINE: str(NOW_MS + offset)}
    assert expired_reason(f"{NOW_MS}-0", fields, None, NOW_MS) == (
        wire.EXPIRED_DEADLINE if offset < 0 else None
    )


def test_the_request_deadline_is_reported_before_the_queue_age() -> None:
    fields = {wire.DEADLINE: str(NOW_MS - 1)}
    assert expired_reason(f"{NOW_MS - 10_000}-0", fields, 1000, NOW_MS) == wire.EXPIRED_DEADLINE
    assert expired_reason(f"{NOW_MS - 10_000}-0", {}, None, NOW_MS) is None  # no limit, no expiry


@pytest.mark.parametrize(
    "deadline", ["", "soon", "1.8e12", "-1", "1800000000000.5", "1" * 17, "\uff11\uff18"]
)  # the last: fullwidth digits
def test_a_deadline_not_in_integer_ms_is_refused(deadline: str) -> None:
    rejection = wire.validate_request({wire.USER_ID: "u", wire.MESSAGE: "m", wire.DEADLINE: deadline}, 100)
    assert rejection is not None and rejection.reason == wire.REASON_INVALID_DEADLINE


def test_a_deadline_in_seconds_is_refused_as_such() -> None:
    rejection = wire.deadline_rejection("1800000000")
    assert rejection is not None and "seconds" in rejection.detail
    assert wire.deadline_rejection(str(NOW_MS)) is None


def test_the_client_writes_seconds_from_now_or_an_aware_datetime_as_unix_ms() -> None:
    before = int(time.time() * 1000)
    assert before + 5000 <= _deadline_ms(5) <= int(time.time() * 1000) + 5000
    at = datetime(2027, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
    assert _deadline_ms(at) == 1_798_859_045_678
    for wrong in (0, -1.5, float("nan"), datetime(2027, 1, 1)):  # the datetime: naive
        with pytest.raises(ValueError, match="deadline"):
            _deadline_ms(wrong)


# -- on a real Redis, with a real worker ------------------------------------------------------------


async def test_entries_older_than_the_queue_age_get_an_expired_reply_and_never_reach_the_handler(
    raw, settings, workers
) -> None:
    xadd_aged(raw, "alice", "stale 1", "old-1", age_ms=120_000)
    xadd_aged(raw, "bob", "stale 2", "old-2", age_ms=61_000)
    send(raw, "alice", "fresh", request_id="new-1")
    handler = Recorder()
    worker = await workers.start(settings(max_queue_age_seconds=60), handler=handler)
    await eventually_async(lambda: group_settled(raw), "every entry acknowledged", timeout=15)
    assert handler.calls == ["fresh"]
    stale, fresh = replies(raw, "alice")
    assert stale == {
        wire.RESPONSE: "",
        wire.EXPIRED: wire.EXPIRED_QUEUE_AGE,
        wire.REQUEST_ID: "old-1",
        wire.WORKER_ID: "w1",
        wire.TIMESTAMP: stale[wire.TIMESTAMP],
    }
    assert fresh[wire.RESPONSE] == "echo: fresh" and wire.EXPIRED not in fresh
    assert [f[wire.EXPIRED] for f in replies(raw, "bob")] == [wire.EXPIRED_QUEUE_AGE]
    assert expired_total(worker, wire.EXPIRED_QUEUE_AGE) == 2
    assert expired_total(worker, wire.EXPIRED_DEADLINE) is None
    assert raw.xlen(wire.dead_letter_stream(STREAM)) == 0


async def test_a_client_deadline_that_passed_raises_request_expired_and_one_in_time_is_answered(
    settings, workers
) -> None:
    s = settings()
    handler = Recorder()
    worker = await workers.start(s, handler=handler)
    async with Client(s.redis_url) as client:
        past = datetime.now(UTC) - timedelta(seconds=1)
        with pytest.raises(RequestExpired) as expired:
            await client.request("alice", "too late", request_id="r1", deadline=past, timeout=15)
        assert expired.value.reason == wire.EXPIRED_DEADLINE
        assert expired.value.reply.request_id == "r1"
        with pytest.raises(RequestExpired):
            async for _ in client.request_stream("alice", "too late, streamed", deadline=past, timeout=15):
                pass
        answer = await client.request("alice", "in time", deadline=60, timeout=15)
    assert answer.response == "echo: in time"
    assert handler.calls == ["in time"]
    assert expired_total(worker, wire.EXPIRED_DEADLINE) == 2


@pytest.mark.parametrize("ordering", ["none", "perUser"])
async def test_an_entry_whose_deadline_passes_while_it_fails_is_not_run_again(
    raw, settings, workers, ordering: str
) -> None:
    """Failed once after its deadline; then reclaimed (``none``) or retried in place (``perUser``):
    the next delivery is answered ``expired`` without a second handler call."""
    handler = Recorder()
    worker = await workers.start(settings(ordering=ordering), handler=handler)
    deadline = str(int(time.time() * 1000) + 300)
    send(raw, "carol", "fail", request_id="r1", **{wire.DEADLINE: deadline})
    await eventually_async(lambda: group_settled(raw), "the entry acknowledged", timeout=15)
    assert handler.calls == ["fail"]
    [reply] = replies(raw, "carol")
    assert reply[wire.EXPIRED] == wire.EXPIRED_DEADLINE and reply[wire.REQUEST_ID] == "r1"
    assert expired_total(worker, wire.EXPIRED_DEADLINE) == 1
    assert worker.metrics.registry.get_sample_value("streamqueue_handler_failures_total") == 1


async def test_a_malformed_deadline_is_dead_lettered(raw, settings, workers) -> None:
    worker = await workers.start(settings(), handler=(handler := Recorder()))
    send(raw, "dave", "hello", request_id="r1", **{wire.DEADLINE: "1800000000"})
    await eventually_async(lambda: group_settled(raw), "the entry acknowledged", timeout=15)
    [dead] = [f for _, f in raw.xrange(wire.dead_letter_stream(STREAM))]
    assert dead[wire.DL_REASON] == wire.REASON_INVALID_DEADLINE
    assert replies(raw, "dave")[0][wire.ERROR].startswith(wire.REASON_INVALID_DEADLINE)
    assert handler.calls == []
    assert expired_total(worker, wire.EXPIRED_DEADLINE) is None
