"""The gateway's quotas on a real redis-server and a real Redis Cluster: per-user and per-tier slots and
tokens per minute, Retry-After, leases that free a crashed gateway's slots, concurrent replicas that
never admit past a limit, and a property test of the admission arithmetic against a model."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from streamqueue.connection import RedisClient, RedisConnection, connect_any
from streamqueue_gateway.auth import AuthError, Principal
from streamqueue_gateway.backpressure import Overloaded
from streamqueue_gateway.quotas import Admission, OverQuota, Quotas, TierLimits
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.redis_server import RedisServer

Connect = Callable[[], Awaitable[RedisClient]]


@pytest.fixture(params=["server", "cluster"])
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Connect]:
    """New clients (one connection pool each, as separate gateway replicas have) to a fresh
    redis-server or to the module's Redis Cluster; closed after the test.

    Each is initialised before use, as a gateway does at start-up: redis-py 8.1's cluster client,
    given many concurrent first commands, disconnects the connections they use when its first slot-map
    load replaces its startup node (AttributeError: 'NoneType' object has no attribute 'writelines').
    """
    if request.param == "server":
        connection = RedisConnection(url=request.getfixturevalue("redis_server").url)
    else:
        connection = RedisConnection(url=request.getfixturevalue("redis_cluster").url, cluster=True)
    clients: list[RedisClient] = []

    async def new() -> RedisClient:
        clients.append(await connect_any(connection).initialize())
        return clients[-1]

    yield new
    for client in clients:
        await client.aclose()


def quotas(redis: RedisClient, namespace: str | None = None, **limits: int) -> Quotas:
    """A gateway's Quotas with the tier ``t`` limited by ``limits``; a fresh namespace per test, since
    the cluster is shared by the module."""
    return Quotas(redis, {"t": TierLimits(**limits)}, namespace=namespace or uuid.uuid4().hex)


async def admits(q: Quotas, user: str, request_id: str | None = None) -> Admission | OverQuota:
    try:
        return await q.admit(Principal(user, "t"), request_id or uuid.uuid4().hex)
    except OverQuota as exc:
        return exc


async def test_a_users_requests_are_limited_until_one_finishes(connect: Connect) -> None:
    q = quotas(await connect(), max_requests=2)
    first, second = await admits(q, "ann"), await admits(q, "ann")
    assert isinstance(first, Admission) and isinstance(second, Admission)
    refused = await admits(q, "ann")
    assert isinstance(refused, OverQuota) and refused.limit == "max_requests"
    assert 0 < refused.retry_after_s <= 1.0
    assert isinstance(await admits(q, "ben"), Admission)  # another user's slots are their own

    await q.finish(first, tokens=10)
    assert isinstance(await admits(q, "ann"), Admission)
    await q.close()


async def test_admitting_the_same_request_again_takes_no_second_slot(connect: Connect) -> None:
    q = quotas(await connect(), max_requests=1, tier_max_requests=1)
    assert isinstance(await admits(q, "ann", "r1"), Admission)
    assert isinstance(await admits(q, "ann", "r1"), Admission)
    assert isinstance(await admits(q, "ann", "r2"), OverQuota)
    await q.close()


async def test_the_tier_limit_counts_every_user_of_the_tier(connect: Connect) -> None:
    q = quotas(await connect(), max_requests=2, tier_max_requests=3)
    held = [await admits(q, "ann"), await admits(q, "ann"), await admits(q, "ben")]
    assert all(isinstance(a, Admission) for a in held)
    refused = await admits(q, "cid")
    assert isinstance(refused, OverQuota) and refused.limit == "tier_max_requests"
    await q.close()


async def test_tokens_per_minute_refuse_until_the_debt_is_refilled(connect: Connect) -> None:
    """6,000 tokens per minute refill 100 a second: 7,200 tokens used leave 12 s of debt."""
    q = quotas(await connect(), tokens_per_minute=6000)
    admission = await admits(q, "ann")
    assert isinstance(admission, Admission)
    assert isinstance(await admits(q, "ann"), Admission)  # tokens are debited only when a reply ends
    await q.finish(admission, tokens=7200)
    refused = await admits(q, "ann")
    assert isinstance(refused, OverQuota) and refused.limit == "tokens_per_minute"
    assert 11.5 < refused.retry_after_s <= 12.001
    assert isinstance(await admits(q, "ben"), Admission)
    await q.close()


async def test_the_tier_tokens_per_minute_count_every_user(connect: Connect) -> None:
    q = quotas(await connect(), tokens_per_minute=100_000, tier_tokens_per_minute=6000)
    for user in ("ann", "ben"):
        admission = await admits(q, user)
        assert isinstance(admission, Admission)
        await q.finish(admission, tokens=3300)
    refused = await admits(q, "cid")
    assert isinstance(refused, OverQuota) and refused.limit == "tier_tokens_per_minute"
    assert 5.5 < refused.retry_after_s <= 6.001
    await q.close()


async def test_an_unknown_tier_is_403(connect: Connect) -> None:
    q = quotas(await connect(), max_requests=1)
    with pytest.raises(AuthError) as caught:
        await q.admit(Principal("ann", "gold"), "r1")
    assert caught.value.status == 403


async def test_a_crashed_gateways_slot_frees_itself_after_its_lease(connect: Connect) -> None:
    """The first gateway stops renewing (crash) without finishing; the second is admitted once the
    lease lapses, told meanwhile to retry no later than the lease's end."""
    namespace = uuid.uuid4().hex
    crashed = Quotas(await connect(), {"t": TierLimits(max_requests=1)}, namespace=namespace, lease_s=1.0)
    other = Quotas(await connect(), {"t": TierLimits(max_requests=1)}, namespace=namespace, lease_s=1.0)
    assert isinstance(await admits(crashed, "ann"), Admission)
    await crashed.close()
    started = time.monotonic()
    refused = await admits(other, "ann")
    assert isinstance(refused, OverQuota) and 0 < refused.retry_after_s <= 1.0

    async def admitted() -> bool:
        return isinstance(await admits(other, "ann"), Admission)

    await eventually_async(admitted, "the crashed gateway's slot to lapse", timeout=10)
    assert time.monotonic() - started < 1.5
    await other.close()


async def test_a_running_request_keeps_its_slot_past_the_lease(connect: Connect) -> None:
    """The renewal, not the lease length, bounds a long request: three leases later it still counts."""
    q = Quotas(await connect(), {"t": TierLimits(max_requests=1)}, namespace=uuid.uuid4().hex, lease_s=0.3)
    admission = await admits(q, "ann")
    assert isinstance(admission, Admission)
    await asyncio.sleep(1.0)  # the elapsed time is what is under test, not a synchronisation
    assert isinstance(await admits(q, "ann"), OverQuota)
    await q.finish(admission, tokens=0)
    assert isinstance(await admits(q, "ann"), Admission)
    await q.close()


async def test_concurrent_replicas_never_admit_past_the_limits(connect: Connect) -> None:
    """Five gateways (five connection pools) race 200 admits of one user, then 200 of many users."""
    namespace = uuid.uuid4().hex
    replicas = [quotas(await connect(), namespace, max_requests=7, tier_max_requests=10) for _ in range(5)]
    results = await asyncio.gather(*(admits(replicas[i % 5], "ann") for i in range(200)))
    assert sum(isinstance(r, Admission) for r in results) == 7
    results = await asyncio.gather(*(admits(replicas[i % 5], f"user{i % 40}") for i in range(200)))
    assert sum(isinstance(r, Admission) for r in results) == 3  # the tier's 10 minus ann's 7
    for q in replicas:
        await q.close()


async def test_redis_down_fails_closed_and_finish_does_not_raise(redis_server: RedisServer) -> None:
    redis = connect_any(RedisConnection(url=redis_server.url))
    q = Quotas(redis, {"t": TierLimits(max_requests=1)}, namespace="ns", timeout_s=1.0)
    admission = await admits(q, "ann")
    assert isinstance(admission, Admission)
    redis_server.stop()
    with pytest.raises(Overloaded) as caught:
        await q.admit(Principal("ann", "t"), "r2")
    assert caught.value.reason == "quotas" and caught.value.retry_after_s > 0
    await q.finish(admission, tokens=5)  # logged: the slot lapses with its lease
    await q.close()
    await redis.aclose()


async def test_an_unlimited_tier_costs_no_redis_round_trip() -> None:
    """Nothing listens on port 1: admitting and finishing in a tier without limits never ask Redis."""
    redis = connect_any(RedisConnection(url="redis://127.0.0.1:1/0"))
    q = Quotas(redis, {"t": TierLimits()}, namespace="ns", timeout_s=0.5)
    admission = await q.admit(Principal("ann", "t"), "r1")
    await q.finish(admission, tokens=100)
    limited = Quotas(redis, {"t": TierLimits(max_requests=1)}, namespace="ns", timeout_s=0.5)
    with pytest.raises(Overloaded):
        await limited.admit(Principal("ann", "t"), "r1")
    await redis.aclose()


def test_namespaces_and_tiers_with_braces_are_refused() -> None:
    with pytest.raises(ValueError, match="braces"):
        Quotas(None, {"a{b": TierLimits()}, namespace="ns")


# --- the admission arithmetic against a model ------------------------------------------------------

TPM = 60_000  # a token a millisecond: the model's clock needs no better than the test's own duration


@dataclass
class Model:
    """What the limits say, with the tokens each user and the tier have spent (all within a moment)."""

    limits: TierLimits
    held: dict[str, list[Admission]] = field(default_factory=dict)
    spent: dict[str, int] = field(default_factory=dict)

    def debt_ms(self, tokens: int, tpm: int) -> float:
        """How far past a full minute the tokens put the bucket: > 0 means refused for that long."""
        return tokens * 60_000 / tpm - 60_000 if tpm else -1e9

    def verdicts(self, user: str) -> dict[str, float]:
        """Each limit's wait in ms if it binds, as the model computes it (0 < slot wait <= 1 s)."""
        lim, count = self.limits, len(self.held.get(user, []))
        total = sum(len(v) for v in self.held.values())
        return {
            "max_requests": 1 if lim.max_requests and count >= lim.max_requests else 0,
            "tier_max_requests": 1 if lim.tier_max_requests and total >= lim.tier_max_requests else 0,
            "tokens_per_minute": max(0, self.debt_ms(self.spent.get(user, 0), lim.tokens_per_minute)),
            "tier_tokens_per_minute": max(
                0, self.debt_ms(sum(self.spent.values()), lim.tier_tokens_per_minute)
            ),
        }


limits_strategy = st.builds(
    TierLimits,
    max_requests=st.integers(0, 3),
    tokens_per_minute=st.sampled_from([0, TPM]),
    tier_max_requests=st.integers(0, 5),
    tier_tokens_per_minute=st.sampled_from([0, TPM, 2 * TPM]),
)
ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.sampled_from(["u1", "u2", "u3"])),
        st.tuples(st.just("finish"), st.integers(0, 10), st.integers(0, 40_000)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limits=limits_strategy, ops=ops_strategy)
def test_admission_matches_the_model(redis_server: RedisServer, limits: TierLimits, ops: list[tuple]) -> None:
    """Admitted iff no limit binds; a refusal names a binding limit and its wait. Token debts near the
    boundary (within the example's own duration) are not judged, the clock having moved meanwhile."""

    async def run() -> None:
        redis = connect_any(RedisConnection(url=redis_server.url))
        q = Quotas(redis, {"t": limits}, namespace=uuid.uuid4().hex)
        model, started = Model(limits), time.monotonic()
        for op in ops:
            if op[0] == "admit":
                await check_admit(q, model, op[1], (time.monotonic() - started) * 1000 + 5)
            else:
                held = [a for admissions in model.held.values() for a in admissions]
                if held:
                    admission = held[op[1] % len(held)]
                    model.held[admission.user_id].remove(admission)
                    model.spent[admission.user_id] = model.spent.get(admission.user_id, 0) + op[2]
                    await q.finish(admission, op[2])
        await q.close()
        await redis.aclose()

    asyncio.run(run())


async def check_admit(q: Quotas, model: Model, user: str, slack_ms: float) -> None:
    verdicts = model.verdicts(user)
    if any(0 < wait <= slack_ms + 1 for name, wait in verdicts.items() if "tokens" in name):
        return  # too close to call: the bucket refilled a little while the example ran
    result = await admits(q, user)
    binding = {name: wait for name, wait in verdicts.items() if wait > 0}
    if isinstance(result, Admission):
        assert not binding, f"admitted although {binding} binds"
        model.held.setdefault(user, []).append(result)
        return
    assert result.limit in binding, f"refused by {result.limit}, the model says {binding}"
    wait_ms = result.retry_after_s * 1000
    if "tokens" in result.limit:
        assert binding[result.limit] - slack_ms <= wait_ms <= binding[result.limit] + 1
    else:
        assert 0 < wait_ms <= 1000
    assert wait_ms >= max(binding.values()) - slack_ms - 1000  # the longest wait binds, not the first
