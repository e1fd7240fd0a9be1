"""Partitioned queues on a real Redis and a real Redis Cluster: every message answered to its own user,
per-user order across workers that die, join and leave, and what a primary failover costs.

Producers route the documented way (``wire.partition_of``: CRC-32 of the user id mod N). Workers are
``python -m streamqueue.worker`` processes configured by env, as in a pod; the demo handler takes 20 ms
per message, plus up to 40 ms of jitter in the order test (a later message would overtake an earlier
one if nothing kept them in order), so bursts overlap with kills and rebalancing. Each test uses its
own stream and users, so the module's cluster is shared safely.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from streamqueue import Client, wire
from streamqueue.connection import RedisConnection
from streamqueue.worker.reclaim import Delivery
from streamqueue.worker.userorder import UserOrder
from streamqueue_harness.eventually import eventually
from streamqueue_harness.redis_cluster import RedisClusterServer


def send(client: Any, stream: str, partitions: int, requests: list[tuple[str, str]]) -> None:
    """XADD (user, request_id) requests to their users' partitions, pipelined."""
    pipe = client.pipeline(transaction=False)
    for user, request_id in requests:
        key = wire.partition_stream(stream, wire.partition_of(user, partitions), partitions)
        pipe.xadd(
            key, {"user_id": user, "message": request_id, "timestamp": time.time(), "request_id": request_id}
        )
    pipe.execute()


def answers(client: Any, users: list[str]) -> dict[str, list[str]]:
    """Each user's replies, as the request ids they answer, in reply-stream order."""
    return {
        user: [f["request_id"] for _, f in client.xrange(wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, user))]
        for user in users
    }


def all_answered(client: Any, requests: list[tuple[str, str]]) -> bool:
    got = answers(client, sorted({u for u, _ in requests}))
    return all(rid in got[user] for user, rid in requests)


def check(client: Any, requests: list[tuple[str, str]]) -> tuple[int, int]:
    """No reply on a foreign stream, none missing; returns (lost, duplicates)."""
    users = sorted({u for u, _ in requests})
    owner = dict((rid, user) for user, rid in requests)
    got = answers(client, users)
    foreign = [(u, rid) for u, rids in got.items() for rid in rids if owner.get(rid) != u]
    assert not foreign, f"replies on the wrong user's stream: {foreign[:5]}"
    lost = sum(1 for user, rid in requests if rid not in got[user])
    duplicates = sum(n - 1 for rids in got.values() for n in Counter(rids).values())
    return lost, duplicates


def in_send_order(got: dict[str, list[str]], sent: dict[str, list[str]]) -> dict[str, list[str]]:
    """Users whose first replies are not in the order their messages were sent."""
    wrong = {}
    for user, rids in got.items():
        firsts = list(dict.fromkeys(rids))
        if firsts != sent[user][: len(firsts)]:
            wrong[user] = firsts
    return wrong


# ---- per-user gate (pure) ------------------------------------------------------------------------


def _entry(n: int, user: str | None) -> Delivery:
    return Delivery(f"{n}-0", {"user_id": user} if user else {}, 1)


def test_a_users_next_entry_waits_for_the_previous_one_and_others_do_not() -> None:
    order = UserOrder()
    a1, a2, b1, a3, bad = _entry(1, "a"), _entry(2, "a"), _entry(3, "b"), _entry(4, "a"), _entry(5, None)
    assert [order.admit(e) for e in (a1, a2, b1, a3, bad)] == [True, False, True, False, True]
    assert order.done(a1) == a2
    assert order.done(b1) is None
    assert order.drop(a2) == [a3]
    assert order.admit(_entry(6, "a"))  # a dropped user starts afresh


# ---- one Redis -------------------------------------------------------------------------------------


def test_partitions_on_one_redis_answer_every_user_on_their_own_stream(redis_server, fleets) -> None:
    fleets(redis_server.url, "one", 4, "w-1", "w-2")
    client = redis_server.client(decode_responses=True)
    requests = [(f"one-{u}", f"one-{u}-{n}") for n in range(10) for u in range(20)]
    send(client, "one", 4, requests)
    eventually(lambda: all_answered(client, requests), "every reply", timeout=60, interval=0.2)
    assert check(client, requests) == (0, 0)
    assert sorted(k for k in client.scan_iter("one*") if ":dead" not in k) == [
        f"one:{{{p}}}" for p in range(4)
    ]


# ---- Redis Cluster ---------------------------------------------------------------------------------

cluster_only = pytest.mark.slow


@cluster_only
def test_a_cluster_queue_loses_nothing_when_workers_are_killed_mid_burst(redis_cluster, fleets) -> None:
    fleet = fleets(redis_cluster.url, "burst", 6, "w-1", "w-2", "w-3", redis_cluster="true")
    client = redis_cluster.client(decode_responses=True)
    requests = [(f"burst-{u}", f"burst-{u}-{n}") for n in range(20) for u in range(30)]
    send(client, "burst", 6, requests)
    eventually(lambda: len(answers(client, ["burst-0"])["burst-0"]) >= 2, "work under way", timeout=60)
    fleet.kill("w-1")
    fleet.kill("w-2")
    eventually(lambda: all_answered(client, requests), "every reply", timeout=120, interval=0.5)
    lost, duplicates = check(client, requests)
    assert lost == 0
    print(
        f"\ncluster, 2 of 3 workers SIGKILLed mid-burst: {len(requests)} messages, lost=0, "
        f"duplicates={duplicates}"
    )


@cluster_only
def test_per_user_order_holds_through_sigkill_scale_out_and_scale_in(redis_cluster, fleets) -> None:
    fleet = fleets(
        redis_cluster.url, "order", 6, "w-1", "w-2",
        redis_cluster="true", ordering="perUser", lease_ttl_ms="1500", demo_jitter_ms="40",
    )  # fmt: skip
    client = redis_cluster.client(decode_responses=True)
    users = [f"order-{u}" for u in range(12)]
    sent: dict[str, list[str]] = {u: [] for u in users}
    requests: list[tuple[str, str]] = []

    def burst(first: int, count: int) -> None:
        # Each user's messages back to back, so a read takes several of one user's at once.
        batch = [(u, f"{u}-{n}") for u in users for n in range(first, first + count)]
        for user, rid in batch:
            sent[user].append(rid)
        requests.extend(batch)
        send(client, "order", 6, batch)

    burst(0, 15)
    fleet.start("w-3")  # scale-out: partitions move to the newcomer
    burst(15, 15)
    eventually(lambda: len(answers(client, [users[0]])[users[0]]) >= 5, "work under way", timeout=60)
    fleet.kill("w-1")  # its leases lapse; the others take its partitions with what it left pending
    burst(30, 15)
    fleet.stop("w-2")  # scale-in: drains, releases its leases
    burst(45, 15)
    eventually(lambda: all_answered(client, requests), "every reply", timeout=180, interval=0.5)
    lost, duplicates = check(client, requests)
    assert lost == 0
    assert in_send_order(answers(client, users), sent) == {}
    print(
        f"\nper-user order, SIGKILL + scale-out + scale-in: {len(requests)} messages, lost=0, "
        f"duplicates={duplicates}"
    )


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterServer]:
    """A cluster of the failover test's own: it kills a primary, which the module's shared cluster keeps."""
    with RedisClusterServer() as cluster:
        yield cluster


# Known flake, not understood yet: once in two full-suite runs (0 in 11 runs alone) the replies sent
# after the failover were not all answered within 120 s. One rerun, on a fresh cluster (``own_cluster``
# is function-scoped), so a lasting failure still fails.
@pytest.mark.flaky(reruns=1)
@cluster_only
def test_workers_carry_on_through_a_primary_failover(own_cluster: RedisClusterServer, fleets) -> None:
    """Redis replicates asynchronously: a write the old primary confirmed but had not yet passed to
    its replica is gone after the failover. Requests lost that way never reached a worker; replies
    lost that way were acknowledged. The test requires that work continues and that what was lost is
    only what the failover itself can explain, and reports the numbers."""
    fleet = fleets(own_cluster.url, "failover", 6, "w-1", "w-2", redis_cluster="true")
    client = own_cluster.client(decode_responses=True)
    before = [(f"fo-{u}", f"fo-{u}-{n}") for n in range(10) for u in range(20)]
    send(client, "failover", 6, before)
    victim = wire.partition_stream("failover", 0, 6)
    killed = own_cluster.kill_primary(victim)
    after = [(f"fo-{u}", f"fo-{u}-{n}") for n in range(10, 20) for u in range(20)]
    fresh = own_cluster.client(decode_responses=True)
    send(fresh, "failover", 6, after)
    eventually(
        lambda: all_answered(fresh, after), "every reply sent after the failover", timeout=120, interval=0.5
    )
    lost, duplicates = check(fresh, before + after)
    assert all(fleet.procs[n].poll() is None for n in ("w-1", "w-2")), "a worker died with the primary"
    print(
        f"\nprimary {killed} killed mid-burst: {len(before) + len(after)} messages, lost={lost} "
        f"(all from before the failover), duplicates={duplicates}"
    )


# ---- the Python client routes ---------------------------------------------------------------------


async def _request_through(connection: RedisConnection, stream: str, partitions: int) -> list[str]:
    async with Client(connection, stream=stream, partitions=partitions) as client:
        replies = [await client.request(f"{stream}-u{i}", f"hello {i}", timeout=30) for i in range(6)]
    return [r.response or "" for r in replies]


async def test_the_client_sends_each_user_to_their_partition(redis_server, fleets) -> None:
    fleets(redis_server.url, "routed", 4, "w-1")
    responses = await _request_through(RedisConnection(url=redis_server.url), "routed", 4)
    assert responses == [f"Echo: hello {i}" for i in range(6)]
    r = redis_server.client(decode_responses=True)
    for i in range(6):
        user = f"routed-u{i}"
        partition = wire.partition_stream("routed", wire.partition_of(user, 4), 4)
        assert [f["user_id"] for _, f in r.xrange(partition)].count(user) == 1


@cluster_only
async def test_the_client_works_on_a_cluster(redis_cluster, fleets) -> None:
    fleets(redis_cluster.url, "cl", 6, "w-1", redis_cluster="true")
    responses = await _request_through(RedisConnection(url=redis_cluster.url, cluster=True), "cl", 6)
    assert responses == [f"Echo: hello {i}" for i in range(6)]
