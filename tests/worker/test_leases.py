"""Partition leases and their rendezvous assignment: pure properties, then the lease keys on a real Redis,
then a worker's stop when releasing its leases fails."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from streamqueue import wire
from streamqueue.settings import WorkerSettings
from streamqueue.worker.leases import Leases, assignment, owner
from streamqueue_harness.eventually import eventually_async

from tests.worker.conftest import STREAM, RunningWorkers, acl_user

PARTITIONS = wire.partition_streams("q", 16)
workers = st.sets(st.from_regex(r"w-[a-z0-9]{1,8}", fullmatch=True), min_size=1, max_size=12)


@given(workers)
def test_every_partition_has_exactly_one_owner_among_the_live_workers(live: set[str]) -> None:
    held = [assignment(PARTITIONS, live, w) for w in sorted(live)]
    assert sorted(p for h in held for p in h) == sorted(PARTITIONS)


@given(workers, st.from_regex(r"n-[a-z0-9]{1,8}", fullmatch=True))
def test_a_joining_worker_takes_partitions_only_for_itself(live: set[str], newcomer: str) -> None:
    """Scale-out moves no partition between the workers already there: minimal rebalancing."""
    for p in PARTITIONS:
        before, after = owner(p, live), owner(p, live | {newcomer})
        assert after in (before, newcomer)


def test_partitions_spread_over_pods_of_one_replicaset_like_random_draws() -> None:
    """Pods of one ReplicaSet have look-alike names; each must still win its share. With 6
    partitions and 3 workers, random assignment leaves a worker idle in about 26 % of fleets."""
    rng = random.Random(7)
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    partitions = wire.partition_streams("user_messages_queue", 6)
    idle = 0
    for _ in range(400):
        suffix = "".join(rng.choice(alphabet) for _ in range(10))
        fleet = {
            f"chat-worker-{suffix[:10]}-{''.join(rng.choice(alphabet) for _ in range(5))}" for _ in range(3)
        }
        held = [assignment(partitions, fleet, w) for w in fleet]
        idle += any(not h for h in held)
    assert idle / 400 < 0.35


def test_the_assignment_is_the_same_whoever_computes_it() -> None:
    live = {"w-a", "w-b", "w-c"}
    assert assignment(PARTITIONS, live, "w-a") == assignment(PARTITIONS, ["w-c", "w-b", "w-a"], "w-a")
    assert owner("q:{0}", []) is None


@pytest.fixture
async def client(redis_server) -> AsyncIterator[aioredis.Redis]:
    connection = aioredis.Redis(port=redis_server.port)
    yield connection
    await connection.aclose()


async def test_a_lease_is_held_by_one_worker_renewed_only_by_it_and_released_only_by_it(client) -> None:
    a = Leases(client, "q", PARTITIONS, "w-a", ttl_ms=5000)
    b = Leases(client, "q", PARTITIONS, "w-b", ttl_ms=5000)
    p = PARTITIONS[0]
    assert await a.acquire(p)
    assert not await b.acquire(p)
    assert not await b.renew(p)
    await b.release(p)
    assert await client.get(wire.lease_key(p)) == b"w-a"
    assert await a.renew(p)
    await a.release(p)
    assert await b.acquire(p)


async def test_an_expired_lease_can_be_taken_and_its_old_holder_cannot_renew_it(client) -> None:
    a = Leases(client, "q", PARTITIONS, "w-a", ttl_ms=50)
    b = Leases(client, "q", PARTITIONS, "w-b", ttl_ms=5000)
    assert await a.acquire(PARTITIONS[1])
    await asyncio.sleep(0.1)  # the TTL itself is what is tested: a holder that paused this long
    assert await b.acquire(PARTITIONS[1])
    assert not await a.renew(PARTITIONS[1])


async def test_the_registry_lists_live_workers_and_forgets_those_that_stop_heartbeating(client) -> None:
    a = Leases(client, "q", PARTITIONS, "w-a", ttl_ms=60_000)
    gone = Leases(client, "q", PARTITIONS, "w-gone", ttl_ms=50)
    await gone.heartbeat()
    assert sorted(await a.heartbeat()) == ["w-a", "w-gone"]
    await asyncio.sleep(0.1)
    assert await a.heartbeat() == ["w-a"]
    await a.leave()
    assert await client.zcard(wire.registry_key("q")) == 0


async def test_a_stop_whose_lease_release_is_refused_still_stops_the_cancel_watch(
    workers: RunningWorkers,
    settings: Callable[..., WorkerSettings],
    raw: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The release is refused (the user lost DEL, which the release script calls); the worker
    logs it, leaves the lease to its TTL, and stops everything else, the cancel watch included."""
    worker = await workers.start(settings(ordering="perUser", **acl_user(raw, "norelease")))
    lease = wire.lease_key(STREAM)
    await eventually_async(lambda: raw.get(lease) == "w1", "the worker holds its lease")
    raw.execute_command("ACL", "SETUSER", "norelease", "-del")
    with caplog.at_level(logging.ERROR, logger="streamqueue.worker"):
        await workers.stop(worker)
    assert "could not release leases" in caplog.text
    assert raw.get(lease) == "w1"
    assert [t for t in asyncio.all_tasks() if t.get_name() == "streamqueue-cancels"] == []
