"""How ``Client`` reads many users' reply streams: one blocking XREAD covers them all, a user who joins
while it blocks is served at once, a bad key fails only its own user, and the blocked reads stay few;
how the reads are paced under load; and how concurrent sends share a round trip.

Replies are written with plain XADDs, as a worker would, against a real redis-server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
from redis.exceptions import ResponseError
from streamqueue import Client, wire
from streamqueue.client import Reply
from streamqueue_harness.eventually import eventually_async

LONG_BLOCK_MS = 30_000  # far beyond every wait below: nothing may depend on a read timing out


def key(user: str) -> str:
    return wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, user)


@pytest.fixture
async def client(redis_server) -> AsyncIterator[Client]:
    async with Client(redis_server.url, block_ms=LONG_BLOCK_MS) as c:
        yield c


async def subscribe(client: Client, user: str) -> tuple[AsyncIterator[Reply], asyncio.Future[Reply]]:
    """A ``responses`` subscription whose reader has taken its position, and its next entry."""
    stream = client.responses(user)
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # the subscription's first step creates the reader
    assert await asyncio.wait_for(client.listening(user), 10)
    return stream, first


def blocked_reads(raw: redis.Redis) -> int:
    return sum(1 for c in raw.client_list() if c["cmd"] == "xread" and "b" in c["flags"])


async def test_a_user_who_joins_while_the_read_blocks_is_served_at_once(client: Client, raw) -> None:
    await subscribe(client, "early")  # its read now blocks for 30 s
    request = asyncio.create_task(client.request("late", "hi", request_id="r1", timeout=5))
    assert await asyncio.wait_for(client.listening("late"), 5)
    raw.xadd(key("late"), {wire.RESPONSE: "hello", wire.REQUEST_ID: "r1"})
    assert (await request).response == "hello"  # within 5 s, not after the 30 s block


async def test_one_read_serves_many_users(client: Client, raw) -> None:
    subscriptions = [await subscribe(client, f"u{u}") for u in range(50)]
    for u in range(50):
        raw.xadd(key(f"u{u}"), {wire.RESPONSE: f"to u{u}"})
    got = await asyncio.wait_for(asyncio.gather(*(first for _, first in subscriptions)), 10)
    assert [reply.response for reply in got] == [f"to u{u}" for u in range(50)]
    await eventually_async(lambda: blocked_reads(raw) == 1, "a single blocked read", timeout=10)


async def test_users_joining_one_by_one_leave_few_blocked_reads(client: Client, raw) -> None:
    """Each join starts a read of every stream; older blocked reads are cut, not left to time out."""
    subscriptions = [await subscribe(client, f"u{u}") for u in range(12)]
    await eventually_async(lambda: blocked_reads(raw) <= 4, "at most 4 blocked reads", timeout=10)
    for u in range(12):
        raw.xadd(key(f"u{u}"), {wire.RESPONSE: f"to u{u}"})
    got = await asyncio.wait_for(asyncio.gather(*(first for _, first in subscriptions)), 10)
    assert [reply.response for reply in got] == [f"to u{u}" for u in range(12)]


async def test_a_key_of_another_type_fails_only_its_own_reader(client: Client, raw) -> None:
    good, good_first = await subscribe(client, "good")
    _, bad_first = await subscribe(client, "bad")
    raw.delete(key("bad"))
    raw.set(key("bad"), "not a stream")
    raw.xadd(key("good"), {wire.RESPONSE: "one"})
    assert (await asyncio.wait_for(good_first, 10)).response == "one"
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await asyncio.wait_for(bad_first, 10)
    raw.xadd(key("good"), {wire.RESPONSE: "two"})
    assert (await asyncio.wait_for(anext(good), 10)).response == "two"
    with pytest.raises(ResponseError, match="WRONGTYPE"):  # a new request for that user fails at once
        await client.request("bad", "hi", timeout=5)


def xread_calls(raw: redis.Redis) -> int:
    return int(raw.info("commandstats").get("cmdstat_xread", {}).get("calls", 0))


async def test_reads_under_load_are_paced_and_lose_nothing(redis_server, raw) -> None:
    """Entries arriving faster than ``read_interval_ms`` are collected a read per interval, not a read
    each (every read names every stream: Redis pays per stream named); each user still gets all of
    theirs, in order."""
    interval_ms, users, rounds = 100, 20, 200
    async with Client(redis_server.url, block_ms=LONG_BLOCK_MS, read_interval_ms=interval_ms) as client:
        subscriptions = [client.responses(f"u{u}") for u in range(users)]
        firsts = [asyncio.ensure_future(anext(stream)) for stream in subscriptions]
        await asyncio.sleep(0)
        for u in range(users):
            assert await asyncio.wait_for(client.listening(f"u{u}"), 10)
        calls_before, started = xread_calls(raw), asyncio.get_running_loop().time()
        for r in range(rounds):  # an entry for some user every 5 ms or so: ~20 per interval
            raw.xadd(key(f"u{r % users}"), {wire.RESPONSE: f"{r}"})
            await asyncio.sleep(0.005)
        got: dict[int, list[str]] = {}
        for u in range(users):
            got[u] = [(await asyncio.wait_for(firsts[u], 10)).response]
            while len(got[u]) < rounds // users:
                got[u].append((await asyncio.wait_for(anext(subscriptions[u]), 10)).response)
        elapsed = asyncio.get_running_loop().time() - started
        reads = xread_calls(raw) - calls_before
    assert got == {u: [str(r) for r in range(u, rounds, users)] for u in range(users)}
    # One read per interval, plus the one in flight when the entries began.
    assert reads <= elapsed * 1000 / interval_ms + 2, (reads, elapsed)


async def test_concurrent_sends_share_a_round_trip_and_keep_their_own_outcome(redis_server, raw) -> None:
    """Sends of one loop turn go as one pipeline; each caller gets its own entry id, or its own error
    (here: a partition whose stream key holds a string)."""
    partitions = 2
    broken = wire.partition_stream(wire.DEFAULT_STREAM, 1, partitions)
    raw.set(broken, "not a stream")
    users = [f"u{u}" for u in range(200)]
    async with Client(redis_server.url, partitions=partitions) as client:
        outcomes = await asyncio.gather(
            *(client.send(u, f"hello {u}", request_id=u) for u in users), return_exceptions=True
        )
    for user, outcome in zip(users, outcomes, strict=True):
        if wire.partition_of(user, partitions) == 1:
            assert isinstance(outcome, ResponseError) and "WRONGTYPE" in str(outcome)
            continue
        assert isinstance(outcome, str)
        [(entry_id, fields)] = raw.xrange(
            wire.partition_stream(wire.DEFAULT_STREAM, 0, partitions), outcome, outcome
        )
        assert (entry_id, fields[wire.REQUEST_ID], fields[wire.MESSAGE]) == (outcome, user, f"hello {user}")
    assert any(isinstance(o, str) for o in outcomes) and any(isinstance(o, ResponseError) for o in outcomes)
