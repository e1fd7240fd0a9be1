"""The consumer-group loop against a real redis-server, with in-process Workers.

Producers and readers are plain redis-py calls in the article's wire format, so these tests check
what any client would see on the streams, not what the worker believes it did.
"""

from __future__ import annotations

import asyncio
import collections

import pytest
from streamqueue import wire
from streamqueue.handlers import Message
from streamqueue_harness.eventually import eventually_async

from tests.worker.conftest import (
    GROUP,
    STREAM,
    acl_user,
    answered_request_ids,
    group_settled,
    replies,
    send,
)

DEAD = wire.dead_letter_stream(STREAM)


async def test_many_users_each_receive_exactly_their_own_replies(raw, settings, workers) -> None:
    await workers.start(settings(batch_size=20, concurrency=40))
    users = [f"user{u}" for u in range(30)]
    for i in range(10):
        for user in users:
            send(raw, user, f"{user} says {i}", request_id=f"{user}-{i}")
    await eventually_async(lambda: group_settled(raw), "all requests answered", timeout=15)
    for user in users:
        got = replies(raw, user)
        assert sorted(f[wire.REQUEST_ID] for f in got) == sorted(f"{user}-{i}" for i in range(10))
        assert all(f[wire.RESPONSE] == f"Echo: {f[wire.REQUEST_ID].replace('-', ' says ')}" for f in got)
        assert all(f[wire.WORKER_ID] == "w1" for f in got)
        assert 0 < raw.ttl(wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, user)) <= 3600


async def test_reply_streams_are_trimmed_and_expire(raw, settings, workers) -> None:
    await workers.start(settings(reply_maxlen=10, reply_ttl_seconds=5))
    for i in range(500):
        send(raw, "chatty", f"m{i}")
    await eventually_async(lambda: group_settled(raw), "all requests answered", timeout=15)
    key = wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, "chatty")
    assert raw.xlen(key) < 500  # MAXLEN ~ trims in whole macro nodes, never below 10
    assert raw.xlen(key) >= 10
    assert 0 < raw.ttl(key) <= 5


async def test_poison_message_is_dead_lettered_after_max_deliveries_while_others_flow(
    raw, settings, workers
) -> None:
    calls: collections.Counter[str] = collections.Counter()

    async def handler(msg: Message) -> str:
        calls[msg.message] += 1
        if msg.message == "poison":
            raise ValueError(f"cannot digest (delivery {msg.deliveries})")
        return f"ok {msg.message}"

    await workers.start(settings(max_deliveries=3, claim_idle_ms=200), handler)
    poison_id = send(raw, "victim", "poison", request_id="p")
    for i in range(30):
        send(raw, "bystander", f"m{i}", request_id=f"b{i}")
    await eventually_async(
        lambda: raw.xlen(DEAD) == 1, "the poison message in the dead-letter stream", timeout=15
    )
    await eventually_async(lambda: group_settled(raw), "nothing left pending", timeout=15)

    [(_, dead)] = raw.xrange(DEAD)
    assert dead[wire.DL_REASON] == wire.REASON_MAX_DELIVERIES
    assert dead[wire.DL_DELIVERIES] == "3"
    assert dead[wire.DL_ERROR] == "ValueError: cannot digest (delivery 3)"
    assert (dead[wire.DL_SOURCE_ID], dead[wire.DL_SOURCE_STREAM]) == (poison_id, STREAM)
    assert (dead[wire.USER_ID], dead[wire.MESSAGE]) == ("victim", "poison")
    assert calls["poison"] == 3
    assert sorted(answered_request_ids(raw, ["bystander"])) == sorted(f"b{i}" for i in range(30))
    [error_reply] = replies(raw, "victim")
    assert error_reply[wire.REQUEST_ID] == "p"
    assert wire.REASON_MAX_DELIVERIES in error_reply[wire.ERROR]


async def test_invalid_messages_are_dead_lettered_with_reason_and_never_reach_the_handler(
    raw, settings, workers
) -> None:
    seen: list[str] = []

    async def handler(msg: Message) -> str:
        seen.append(msg.message)
        return "ok"

    await workers.start(settings(max_message_bytes=100), handler)
    send(raw, None, "no user")
    send(raw, "", "empty user")
    send(raw, "a b", "space in user")
    send(raw, "x" * (wire.MAX_USER_ID_LENGTH + 1), "long user")
    send(raw, "ai_to_user:other", "colon in user")
    send(raw, "big", "x" * 101, request_id="too-big")
    raw.xadd(STREAM, {wire.USER_ID: "nomessage"})
    send(raw, "good", "valid")
    await eventually_async(lambda: raw.xlen(DEAD) == 7, "seven dead letters", timeout=15)
    await eventually_async(lambda: group_settled(raw), "every entry acknowledged", timeout=15)

    reasons = [f[wire.DL_REASON] for _, f in raw.xrange(DEAD)]
    assert reasons == [
        wire.REASON_MISSING_USER_ID,
        wire.REASON_MISSING_USER_ID,
        wire.REASON_INVALID_USER_ID,
        wire.REASON_INVALID_USER_ID,
        wire.REASON_INVALID_USER_ID,
        wire.REASON_MESSAGE_TOO_LARGE,
        wire.REASON_MISSING_MESSAGE,
    ]
    assert all(f[wire.DL_DELIVERIES] == "1" for _, f in raw.xrange(DEAD))
    assert seen == ["valid"]
    # Only well-formed user ids get an error reply; unsafe ones never become a key.
    assert [r[wire.REQUEST_ID] for r in replies(raw, "big")] == ["too-big"]
    assert wire.REASON_MESSAGE_TOO_LARGE in replies(raw, "big")[0][wire.ERROR]
    keys = set(raw.scan_iter(match=f"{wire.DEFAULT_REPLY_PREFIX}*"))
    assert keys == {f"{wire.DEFAULT_REPLY_PREFIX}{u}" for u in ("big", "nomessage", "good")}


async def test_error_replies_can_be_switched_off(raw, settings, workers) -> None:
    await workers.start(settings(max_message_bytes=10, error_replies=False))
    send(raw, "bob", "far too long for the limit")
    await eventually_async(lambda: raw.xlen(DEAD) == 1 and group_settled(raw), "the dead letter", timeout=15)
    assert replies(raw, "bob") == []


async def test_entries_of_a_dead_consumer_are_reclaimed(raw, settings, workers) -> None:
    for i in range(12):
        send(raw, "orphan", f"m{i}", request_id=f"r{i}")
    raw.xgroup_create(STREAM, GROUP, id="0")
    raw.xreadgroup(GROUP, "crashed-pod", {STREAM: ">"}, count=12)  # read, never acknowledged
    deliveries: list[int] = []

    async def handler(msg: Message) -> str:
        deliveries.append(msg.deliveries)
        return "recovered"

    worker = await workers.start(settings(claim_idle_ms=200, batch_size=5), handler)
    await eventually_async(lambda: group_settled(raw), "the orphaned entries answered", timeout=15)
    assert sorted(answered_request_ids(raw, ["orphan"])) == sorted(f"r{i}" for i in range(12))
    assert deliveries == [2] * 12
    assert worker.metrics.registry.get_sample_value("streamqueue_messages_reclaimed_total") == 12


async def test_deleted_pending_entries_are_cleaned_up(raw, settings, workers) -> None:
    ids = [send(raw, "gone", f"m{i}") for i in range(3)]
    raw.xgroup_create(STREAM, GROUP, id="0")
    raw.xreadgroup(GROUP, "crashed-pod", {STREAM: ">"}, count=3)
    raw.xdel(STREAM, ids[0], ids[1])
    await workers.start(settings(claim_idle_ms=200))
    await eventually_async(lambda: group_settled(raw), "the pending list emptied", timeout=15)
    assert [r[wire.RESPONSE] for r in replies(raw, "gone")] == ["Echo: m2"]


async def test_a_long_handler_keeps_its_claim(raw, settings, workers) -> None:
    calls = collections.Counter()

    async def slow(msg: Message) -> str:
        calls[msg.message] += 1
        await asyncio.sleep(1.5)  # five times the claim idle time
        return "done"

    await workers.start(settings(consumer="a", claim_idle_ms=300), slow)
    await workers.start(settings(consumer="b", claim_idle_ms=300), slow)
    send(raw, "patient", "slow-1", request_id="s1")
    send(raw, "patient", "slow-2", request_id="s2")
    await eventually_async(lambda: group_settled(raw), "the slow requests answered", timeout=15)
    assert calls == {"slow-1": 1, "slow-2": 1}
    assert sorted(answered_request_ids(raw, ["patient"])) == ["s1", "s2"]


async def test_dict_replies_carry_extra_fields(raw, settings, workers) -> None:
    async def handler(msg: Message) -> dict[str, object]:
        return {wire.RESPONSE: msg.message.upper(), "tokens": 3}

    await workers.start(settings(), handler)
    send(raw, "carol", "hi", request_id="c1")
    await eventually_async(lambda: group_settled(raw), "the reply", timeout=15)
    [reply] = replies(raw, "carol")
    assert (reply[wire.RESPONSE], reply["tokens"], reply[wire.REQUEST_ID]) == ("HI", "3", "c1")


async def test_chunks_are_written_only_when_streaming_is_on(raw, settings, workers) -> None:
    async def words(msg: Message):
        for word in msg.message.split():
            yield word

    worker = await workers.start(settings(stream_replies=False), words)
    send(raw, "dave", "a b c")
    await eventually_async(lambda: group_settled(raw), "the reply", timeout=15)
    assert replies(raw, "dave") == [
        {wire.RESPONSE: "abc", wire.WORKER_ID: "w1", wire.TIMESTAMP: replies(raw, "dave")[0][wire.TIMESTAMP]}
    ]
    await workers.stop(worker)
    await workers.start(settings(stream_replies=True, chunk_flush_ms=0), words)  # an entry per chunk
    send(raw, "erin", "a b c")
    await eventually_async(lambda: group_settled(raw), "the streamed reply", timeout=15)
    got = replies(raw, "erin")
    assert [(f.get(wire.CHUNK), f.get(wire.SEQ)) for f in got[:-1]] == [("a", "0"), ("b", "1"), ("c", "2")]
    assert got[-1][wire.RESPONSE] == "abc"


async def test_worker_recovers_after_a_redis_restart(raw, redis_server, settings, workers) -> None:
    worker = await workers.start(settings())
    send(raw, "alice", "before", request_id="1")
    await eventually_async(lambda: group_settled(raw), "the first reply", timeout=15)
    redis_server.stop()  # without persistence: the stream and the group are gone, as after a failover
    await eventually_async(lambda: not worker.ready, "the worker to notice the outage", timeout=15)
    redis_server.start()
    fresh = redis_server.client(decode_responses=True)
    await eventually_async(lambda: worker.ready, "the worker ready again", timeout=15)
    send(fresh, "alice", "after", request_id="2")
    await eventually_async(lambda: group_settled(fresh), "the reply after the restart", timeout=15)
    assert answered_request_ids(fresh, ["alice"]) == ["2"]
    assert worker.metrics.registry.get_sample_value("streamqueue_redis_errors_total") > 0


async def test_stop_finishes_in_flight_work(raw, settings, workers) -> None:
    started = asyncio.Event()

    async def slow(msg: Message) -> str:
        started.set()
        await asyncio.sleep(0.5)
        return "finished"

    worker = await workers.start(settings(concurrency=50, batch_size=50), slow)
    for i in range(40):
        send(raw, "frank", f"m{i}", request_id=str(i))
    await asyncio.wait_for(started.wait(), 10)
    await workers.stop(worker)
    answered = answered_request_ids(raw, ["frank"])
    assert len(answered) == len(set(answered))
    [group] = raw.xinfo_groups(STREAM)
    # Everything the worker read was answered and acked; the rest was never delivered.
    assert group["pending"] == 0
    assert len(answered) + group["lag"] == 40


async def test_work_unfinished_at_the_grace_deadline_is_handed_back(raw, settings, workers) -> None:
    async def stuck(msg: Message) -> str:
        await asyncio.sleep(60)
        return "never"

    worker = await workers.start(
        settings(consumer="leaving", shutdown_grace_seconds=0.2, claim_idle_ms=5000), stuck
    )
    for i in range(5):
        send(raw, "gina", f"m{i}", request_id=str(i))
    await eventually_async(
        lambda: raw.xpending(STREAM, GROUP)["pending"] == 5, "five entries in flight", timeout=15
    )
    await workers.stop(worker, within=10)
    pending = raw.xpending_range(STREAM, GROUP, min="-", max="+", count=10)
    assert len(pending) == 5
    assert all(p["time_since_delivered"] >= 5000 for p in pending)  # marked idle: reclaimable now
    await workers.start(settings(consumer="taker", claim_idle_ms=5000))
    await eventually_async(lambda: group_settled(raw), "another worker to take over", timeout=15)
    assert sorted(answered_request_ids(raw, ["gina"])) == [str(i) for i in range(5)]


@pytest.mark.parametrize("concurrency", [1, 7])
async def test_in_flight_never_exceeds_concurrency(raw, settings, workers, concurrency: int) -> None:
    running = 0
    peak = 0

    async def handler(msg: Message) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return "ok"

    await workers.start(settings(concurrency=concurrency, batch_size=5), handler)
    for i in range(40):
        send(raw, "henry", f"m{i}")
    await eventually_async(lambda: group_settled(raw), "all answered", timeout=15)
    assert peak == concurrency


async def test_replies_flow_for_an_acl_user_that_may_not_run_scripts(raw, settings, workers, caplog) -> None:
    await workers.start(settings(**acl_user(raw, "noscript", "-@scripting")))
    for i in range(5):
        send(raw, "lena", f"m{i}", request_id=str(i))
    await eventually_async(lambda: group_settled(raw), "replies committed with pipelines", timeout=15)
    assert sorted(answered_request_ids(raw, ["lena"])) == [str(i) for i in range(5)]
    assert "committing with pipelines instead" in caplog.text


async def test_a_reply_key_of_another_type_does_not_block_the_batch(raw, settings, workers) -> None:
    raw.set(wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, "clash"), "not a stream")
    await workers.start(settings())
    send(raw, "clash", "lost reply")
    send(raw, "mike", "fine", request_id="m1")
    await eventually_async(lambda: group_settled(raw), "the batch acknowledged", timeout=15)
    assert answered_request_ids(raw, ["mike"]) == ["m1"]
    assert raw.get(wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, "clash")) == "not a stream"


async def test_chunks_of_a_failed_stream_still_expire(raw, settings, workers) -> None:
    async def breaks_halfway(msg: Message):
        yield "partial "
        yield "answer"
        raise RuntimeError("model went away")

    worker = await workers.start(
        settings(stream_replies=True, reply_ttl_seconds=60, chunk_flush_ms=0), breaks_halfway
    )
    send(raw, "olga", "tell me")
    await eventually_async(
        lambda: worker.metrics.registry.get_sample_value("streamqueue_handler_failures_total") == 1,
        "the failed handler",
        timeout=15,
    )
    # Chunks are queued, not awaited one by one: the last may land just after the failure is counted.
    await eventually_async(
        lambda: [f[wire.CHUNK] for f in replies(raw, "olga")] == ["partial ", "answer"], "the chunks", 15
    )
    assert 0 < raw.ttl(wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, "olga")) <= 60


async def test_a_reply_finished_during_an_outage_is_written_once_redis_is_back(
    raw, redis_server, settings, workers, caplog
) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def waits(msg: Message) -> str:
        started.set()
        await release.wait()
        return "worth the wait"

    await workers.start(settings(), waits)
    send(raw, "paul", "hold on", request_id="p1")
    await asyncio.wait_for(started.wait(), 10)
    redis_server.stop()
    release.set()  # the handler finishes while Redis is down: the commit must be retried, not dropped
    await eventually_async(
        lambda: "reply/ack commit failed" in caplog.text, "the flusher's failed commit during the outage", 15
    )
    redis_server.start()
    fresh = redis_server.client(decode_responses=True)
    await eventually_async(lambda: replies(fresh, "paul"), "the reply after the outage", timeout=15)
    assert [(r[wire.RESPONSE], r[wire.REQUEST_ID]) for r in replies(fresh, "paul")] == [
        ("worth the wait", "p1")
    ]


async def test_more_finished_entries_than_one_commit_takes(raw, settings, workers) -> None:
    async def together(msg: Message) -> str:
        await asyncio.sleep(0.2)  # the whole batch finishes at once
        return msg.message

    await workers.start(settings(concurrency=1200, batch_size=1000), together)
    pipe = raw.pipeline(transaction=False)
    for i in range(1200):
        pipe.xadd(STREAM, {wire.USER_ID: f"u{i % 7}", wire.MESSAGE: f"m{i}", wire.REQUEST_ID: str(i)})
    pipe.execute()
    await eventually_async(lambda: group_settled(raw), "all 1200 answered", timeout=15)
    answered = answered_request_ids(raw, [f"u{u}" for u in range(7)])
    assert sorted(answered, key=int) == [str(i) for i in range(1200)]
