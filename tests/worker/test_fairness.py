"""Per-user fairness on a real redis-server and a real Redis Cluster.

The order tests record the order in which the handler starts entries; with one slot that is exactly
the dispatch order. Their backlogs outlast the claim idle time many times over, so a reclaimer that
took the entries waiting their fair turn for idle ones would put them back in arrival order and fail
the test.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from streamqueue import wire
from streamqueue.handlers import Message
from streamqueue_harness.eventually import eventually, eventually_async

from tests.worker.conftest import STREAM, group_settled, send
from tests.worker.test_partitions import all_answered, answers, check, in_send_order
from tests.worker.test_partitions import send as send_partitioned


class StartOrder:
    """A handler that records which user's entry starts when, and takes ``seconds`` per entry."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started: list[tuple[float, str]] = []

    async def __call__(self, msg: Message) -> str:
        self.started.append((time.monotonic(), msg.user_id))
        await asyncio.sleep(self.seconds)
        return "ok"

    @property
    def users(self) -> list[str]:
        return [user for _, user in self.started]


@pytest.mark.parametrize("fairness", ["perUser", "none"])
async def test_users_start_round_robin_whatever_their_backlog(raw, settings, workers, fairness) -> None:
    backlog = {"heavy": 60, "medium": 30, "light": 1}
    for user, count in backlog.items():  # all sent before any worker runs: arrival order is by user
        for n in range(count):
            send(raw, user, f"{user} {n}")
    handler = StartOrder(0.01)
    await workers.start(settings(concurrency=1, batch_size=1, claim_idle_ms=200, fairness=fairness), handler)
    await eventually_async(lambda: group_settled(raw), "every entry answered", timeout=30)

    if fairness == "none":
        assert handler.users == ["heavy"] * 60 + ["medium"] * 30 + ["light"]
        return
    rounds = [["heavy", "medium", "light"]] + [["heavy", "medium"]] * 29 + [["heavy"]] * 30
    assert handler.users == [user for turn in rounds for user in turn]
    assert raw.zcard(wire.fair_key(STREAM)) == 0
    assert raw.hlen(wire.fair_clock_key(STREAM)) <= 2 + len(backlog)  # idle users' tags are pruned


async def test_a_newcomer_waits_for_at_most_one_entry_per_waiting_user(raw, settings, workers) -> None:
    handler = StartOrder(0.02)
    for name in ("w1", "w2"):
        await workers.start(settings(consumer=name, concurrency=4, fairness="perUser"), handler)
    for n in range(400):
        send(raw, "burst", f"burst {n}")
    await eventually_async(lambda: len(handler.started) >= 20, "the burst under way", timeout=15)
    sent_at = time.monotonic()
    send(raw, "newcomer", "hello")
    await eventually_async(lambda: "newcomer" in handler.users, "the newcomer's message started", timeout=30)

    started_at = next(at for at, user in handler.started if user == "newcomer")
    overtaken = sum(1 for at, user in handler.started if user == "burst" and sent_at < at < started_at)
    # Bound: 2 * 1 waiting user - 1 dispatches, plus the 8 slots that may free while it is moved in.
    assert overtaken <= 1 + 8, f"{overtaken} burst entries started ahead of the newcomer"
    assert len(handler.started) < 100, "the burst was nearly done anyway: the test measured nothing"
    await eventually_async(lambda: group_settled(raw), "the burst answered", timeout=60)


def test_nothing_is_lost_when_a_fair_worker_is_killed(redis_server, fleets) -> None:
    settings = {"fairness": "perUser", "concurrency": "4", "claim_idle_ms": "1000"}
    fleet = fleets(redis_server.url, "fairkill", 2, "w-1", "w-2", **settings)
    client = redis_server.client(decode_responses=True)
    requests = [(f"fk-{u}", f"fk-{u}-{n}") for u in range(6) for n in range(10 * (u + 1))]
    send_partitioned(client, "fairkill", 2, requests)
    eventually(lambda: sum(map(len, answers(client, ["fk-5"]).values())) >= 3, "work under way", timeout=60)
    fleet.kill("w-1")
    eventually(lambda: all_answered(client, requests), "every reply", timeout=120, interval=0.3)
    assert check(client, requests)[0] == 0
    for stream in wire.partition_streams("fairkill", 2):
        assert client.zcard(wire.fair_key(stream)) == 0


@pytest.mark.slow
def test_fairness_keeps_per_user_order_on_a_cluster(redis_cluster, fleets) -> None:
    fleets(
        redis_cluster.url, "fairorder", 3, "w-1", "w-2",
        redis_cluster="true", ordering="perUser", fairness="perUser", demo_jitter_ms="30",
    )  # fmt: skip
    client = redis_cluster.client(decode_responses=True)
    requests = [(f"fo-{u}", f"fo-{u}-{n}") for n in range(40) for u in range(8) if n < 5 * (u + 1)]
    send_partitioned(client, "fairorder", 3, requests)
    eventually(lambda: all_answered(client, requests), "every reply", timeout=120, interval=0.5)
    sent: dict[str, list[str]] = {}
    for user, rid in requests:
        sent.setdefault(user, []).append(rid)
    assert in_send_order(answers(client, sorted(sent)), sent) == {}
    assert check(client, requests)[0] == 0
