"""The ACL rules of ``streamqueue.acl`` on a real redis-server: a whole queue's flow runs under users built
exactly from them, with no denial in the ACL LOG, and without any single rule it runs into NOPERM.

The flow: a worker with the model handler (limits, memory), per-user ordering and fairness over two
partitions, a client's requests (one reply stream read through a group: PERSIST), an invalid entry
(dead letter), a cancel of a running call; then the operator's observation, pod ranking loads,
dead-consumer cleanup and trimming. One redis-server serves the module; each run starts from FLUSHALL,
SCRIPT FLUSH and an empty ACL LOG, and a run without a rule ends at that rule's first denial. redis-py's
health check PINGs a connection idle longer than HEALTH_CHECK_S here (30 s in production), so a user
without +ping fails within the run, not only after an idle half-minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from aiohttp import web
from streamqueue import acl, connection, wire
from streamqueue.client import Client, RequestCancelled
from streamqueue.connection import RedisConnection, connect_any
from streamqueue.settings import WorkerSettings
from streamqueue.worker import Worker
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.modelserver import StubChatServer, stream_completion
from streamqueue_harness.redis_server import RedisServer
from streamqueue_operator.housekeeping import remove_dead_consumers, trim_processed
from streamqueue_operator.observe import consumer_loads, observe
from streamqueue_operator.rest_check import not_idle

QUEUE = acl.QueueKeys(
    stream="aclq", partitions=2, ordering=True, fairness=True, model_calls=True, memory=True
)
PLAIN = acl.QueueKeys(stream="aclq", partitions=2)  # no ordering, fairness, memory: reclaims by XAUTOCLAIM
GROUP, CONSUMER, DEAD = "aclq-group", "w-1", "gone-1"
USERS = ["ann", "bob", "cy", "dee"]  # over both partitions
SLOW = "slowpoke"  # its call waits until cancelled
WORKER_USER, OPERATOR_USER = "sq-worker", "sq-operator"
# redis-py's health-check interval in these runs. Not much shorter: redis-py pipelines a new
# connection's CLIENT SETINFO commands, and a check falling due between them would read the wrong reply.
HEALTH_CHECK_S = 0.05
# The worker's drain grace: a run stopped at its first NOPERM may hold entries it can never commit.
GRACE_S = 0.5


@pytest.fixture(autouse=True)
def _short_health_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_S)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


def _setup(admin: redis.Redis, worker: list[str], operator: list[str]) -> None:
    admin.flushall()
    admin.script_flush()
    admin.execute_command("ACL", "LOG", "RESET")
    for user, rules in ((WORKER_USER, worker), (OPERATOR_USER, operator)):
        admin.execute_command("ACL", "SETUSER", user, "reset", "on", ">pw", *rules)


def _denials(admin: redis.Redis) -> list[dict[str, Any]]:
    return [e for e in admin.acl_log() if e["username"] in (WORKER_USER, OPERATOR_USER)]


class Model:
    """The stub chat API: answers at once, except the SLOW user's call, which waits to be cancelled."""

    def __init__(self) -> None:
        self.slow_started = asyncio.Event()
        self.release = asyncio.Event()

    async def respond(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if SLOW in str(body["messages"][-1]["content"]):
            self.slow_started.set()
            await self.release.wait()  # at teardown: the worker cancelled this call and hung up long ago
            raise web.HTTPGone
        return await stream_completion(request, ["fine"])


async def _flow(q: acl.QueueKeys, url: str, base_url: str, model: Model, admin: redis.Redis) -> None:
    """Every component's Redis commands once, as the ACL users (the client and set-up: the default user)."""
    streams = q.partition_streams()
    admin.xgroup_create(wire.reply_stream(q.reply_prefix, USERS[0]), "readers", id="0", mkstream=True)
    worker = Worker(
        WorkerSettings(
            redis_url=url, redis_username=WORKER_USER, redis_password="pw", stream=QUEUE.stream, group=GROUP,
            partitions=QUEUE.partitions, consumer=CONSUMER, ordering="perUser" if q.ordering else "none",
            fairness="perUser" if q.fairness else "none",
            handler="streamqueue.handlers.openai:handle", openai_base_url=base_url, openai_model="stub",
            openai_memory_turns=2 if q.memory else 0,
            model_requests_per_minute=60_000, model_concurrent_calls=4,
            block_ms=100, claim_idle_ms=300, health_port=0, shutdown_grace_seconds=GRACE_S,
        )
    )  # fmt: skip
    running = asyncio.create_task(worker.run())
    try:
        async with Client(url, stream=QUEUE.stream, partitions=QUEUE.partitions) as client:
            replies = await asyncio.gather(*(client.request(u, "hello", timeout=30) for u in USERS))
            assert [r.response for r in replies] == ["fine"] * len(USERS)
            slow = asyncio.create_task(client.request(SLOW, SLOW, request_id="r-slow", timeout=30))
            await asyncio.wait_for(model.slow_started.wait(), 30)
            await client.cancel(SLOW, "r-slow")
            with pytest.raises(RequestCancelled):
                await slow
        for stream in streams:
            admin.xadd(stream, {wire.MESSAGE: "no user"})
        dead = q.dead_letter_streams()
        await eventually_async(lambda: [admin.xlen(d) for d in dead] == [1] * len(dead), "dead-lettered")
        admin.xgroup_createconsumer(streams[0], GROUP, DEAD)  # a consumer whose pod is gone
        await _operator(url, streams)
    finally:
        model.release.set()
        worker.request_stop()
        await asyncio.wait_for(running, 30)


async def _operator(url: str, streams: list[str]) -> None:
    """The operator's poll: observation with the limit-bound key, the rest sweep's check, ranking
    loads, housekeeping."""
    client = connect_any(RedisConnection(url=url, username=OPERATOR_USER, password="pw"))
    try:
        obs = await observe(
            client, streams, GROUP, time.monotonic(), limit_key=wire.limit_bound_key(QUEUE.stream)
        )
        assert obs.ok, obs
        assert await not_idle(client, [(s, GROUP) for s in streams], cluster=False) == set()
        await asyncio.sleep(HEALTH_CHECK_S)  # idle as between two polls: the next command PINGs first
        assert CONSUMER in await consumer_loads(client, streams, GROUP)
        for stream in streams:
            await remove_dead_consumers(client, stream, GROUP, {CONSUMER})
            await trim_processed(client, stream)
    finally:
        await client.aclose()


async def _run(q: acl.QueueKeys, server: RedisServer, worker: list[str], operator: list[str]) -> None:
    admin = server.client(decode_responses=True)
    _setup(admin, worker, operator)
    model = Model()
    stub = await StubChatServer(model.respond).start()
    try:
        await _flow(q, server.url, stub.base_url, model, admin)
    finally:
        await stub.stop()


@pytest.mark.parametrize("q", [QUEUE, PLAIN], ids=["every-feature", "plain"])
async def test_a_whole_flow_runs_under_the_generated_users(server: RedisServer, q: acl.QueueKeys) -> None:
    await _run(q, server, acl.worker_rules(q), acl.operator_rules(q))
    assert _denials(server.client(decode_responses=True)) == []


def _drops() -> list[Any]:
    """Every rule of QUEUE's users dropped in turn; of PLAIN's, those QUEUE's users do not have."""
    params = []
    for q, covered in ((QUEUE, set()), (PLAIN, {*acl.worker_rules(QUEUE), *acl.operator_rules(QUEUE)})):
        prefix = "plain-" if q is PLAIN else ""
        worker, operator = acl.worker_rules(q), acl.operator_rules(q)
        for i, rule in enumerate(worker):
            if rule not in covered:
                params.append(
                    pytest.param(q, _without(worker, i), operator, rule, id=f"{prefix}worker{rule}")
                )
        for i, rule in enumerate(operator):
            if rule not in covered:
                params.append(
                    pytest.param(q, worker, _without(operator, i), rule, id=f"{prefix}operator{rule}")
                )
    return params


def _without(rules: list[str], i: int) -> list[str]:
    return rules[:i] + rules[i + 1 :]


DROPS = _drops()


async def _denied_by(
    server: RedisServer, q: acl.QueueKeys, worker: list[str], operator: list[str], dropped: str
) -> list[dict[str, Any]]:
    """Run the flow without ``dropped`` until the ACL LOG names it; that rule's denials."""
    admin = server.client(decode_responses=True)
    named = _named(dropped)

    def denied() -> list[dict[str, Any]]:
        return [e for e in _denials(admin) if named in e["object"]]

    flow = asyncio.create_task(_run(q, server, worker, operator))
    waiting = asyncio.create_task(eventually_async(denied, f"a NOPERM naming {named}", timeout=60))
    await asyncio.wait([flow, waiting], return_when=asyncio.FIRST_COMPLETED)
    for task in (flow, waiting):
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    return denied()  # also those of the flow's last steps (a worker's stop releases its leases)


def _named(rule: str) -> str:
    """The command, key or channel of ``rule``, as the ACL LOG's ``object`` shows it."""
    return rule.lstrip("+~&").replace("\\", "").rstrip("*")


@pytest.mark.parametrize(("q", "worker", "operator", "dropped"), DROPS)
async def test_every_rule_is_needed(
    server: RedisServer, q: acl.QueueKeys, worker: list[str], operator: list[str], dropped: str
) -> None:
    denials = await _denied_by(server, q, worker, operator, dropped)
    assert denials, f"the flow needs no {dropped}: no NOPERM naming {_named(dropped)}"


def test_key_names_are_exact_and_glob_characters_escaped() -> None:
    rules = acl.worker_rules(acl.QueueKeys(stream="q*[1]", model_calls=False))
    assert "~q\\*\\[1\\]" in rules and "~q*" not in rules
    assert [r for r in rules if r.endswith("*")] == ["~ai_to_user:*"]  # the one prefix: reply streams


def test_a_shared_user_gets_both_lists_once(capsys: pytest.CaptureFixture[str]) -> None:
    acl.main(["--stream", "s", "--shared-user", "both"])
    [line] = capsys.readouterr().out.splitlines()
    words = shlex.split(line)
    assert words[:5] == ["ACL", "SETUSER", "both", "reset", "on"]
    granted = words[6:]
    assert set(granted) == {*acl.worker_rules(acl.QueueKeys("s")), *acl.operator_rules(acl.QueueKeys("s"))}
    assert len(granted) == len(set(granted))
