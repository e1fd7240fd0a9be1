"""Dead letters inspected, redriven and purged (``streamqueue.deadletters`` and ``python -m
streamqueue.sqtool dlq``), against a real redis-server, a real Redis Cluster and a real worker process."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot
from redis.exceptions import ResponseError
from streamqueue import acl, deadletters, wire
from streamqueue.connection import RedisConnection, connect_any
from streamqueue.settings import WorkerSettings
from streamqueue.sqtool.__main__ import run
from streamqueue.sqtool.args import parser
from streamqueue.worker.replies import dead_letter_fields
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.workerproc import spawn_worker

from tests.worker.conftest import STREAM, send

DEAD = wire.dead_letter_stream(STREAM)
FAILING_HANDLER = """
async def handle(msg):
    raise RuntimeError("model is down")
"""


def write_dead_letter(r: Any, stream: str, user: str, request_id: str, reason: str, *, age: float = 0) -> str:
    """A dead letter exactly as the worker writes it, ``age`` seconds old."""
    original = {wire.USER_ID: user, wire.MESSAGE: "hi", wire.REQUEST_ID: request_id, wire.TIMESTAMP: "1"}
    fields = dead_letter_fields(
        original, reason=reason, error="boom", deliveries=5, source_id="1-1", source_stream=STREAM,
        consumer="w1",
    )  # fmt: skip
    fields[wire.DL_AT] = f"{time.time() - age:.6f}"
    return str(r.xadd(stream, fields))


async def sqtool(settings: WorkerSettings, *argv: str) -> dict[str, Any]:
    return await run(settings, parser().parse_args(argv))


async def test_list_filters_by_reason_user_and_age(raw, settings) -> None:
    write_dead_letter(raw, DEAD, "ada", "r1", wire.REASON_MAX_DELIVERIES, age=7200)
    write_dead_letter(raw, DEAD, "bo", "r2", wire.REASON_MAX_DELIVERIES)
    write_dead_letter(raw, DEAD, "ada", "r3", wire.REASON_MESSAGE_TOO_LARGE)
    s = settings()

    async def ids(*filters: str) -> list[str]:
        listed = await sqtool(s, "dlq", "list", *filters)
        return [letter["request_id"] for letter in listed["dead_letters"]]

    assert await ids() == ["r1", "r2", "r3"]
    assert await ids("--reason", wire.REASON_MAX_DELIVERIES) == ["r1", "r2"]
    assert await ids("--user", "ada") == ["r1", "r3"]
    assert await ids("--older-than", "1h") == ["r1"]
    assert await ids("--newer-than", "10m", "--user", "ada") == ["r3"]
    assert await ids("--limit", "1") == ["r1"]


async def test_purge_deletes_only_the_matching_and_dry_run_deletes_nothing(raw, settings) -> None:
    write_dead_letter(raw, DEAD, "ada", "r1", wire.REASON_MAX_DELIVERIES)
    kept = write_dead_letter(raw, DEAD, "bo", "r2", wire.REASON_MAX_DELIVERIES)
    write_dead_letter(raw, DEAD, "ada", "r3", wire.REASON_INVALID_USER_ID)
    s = settings()
    dry = await sqtool(s, "dlq", "purge", "--user", "ada", "--dry-run")
    assert [d["request_id"] for d in dry["dead_letters"]] == ["r1", "r3"] and raw.xlen(DEAD) == 3
    with pytest.raises(ValueError, match="--all"):
        await sqtool(s, "dlq", "purge")
    assert (await sqtool(s, "dlq", "purge", "--user", "ada"))["purged"] == 2
    assert [entry_id for entry_id, _ in raw.xrange(DEAD)] == [kept]


async def test_redrive_keeps_the_request_counts_the_redrive_and_routes_to_the_users_partition(
    raw, settings
) -> None:
    s = settings(partitions=4)
    dead = s.dead_letter(wire.partition_stream(STREAM, 1, 4))
    write_dead_letter(raw, dead, "alice", "r1", wire.REASON_MAX_DELIVERIES)  # alice: partition 3
    dry = await sqtool(s, "dlq", "redrive", "--all", "--dry-run")
    assert len(dry["dead_letters"]) == 1 and raw.xlen(dead) == 1
    [done] = (await sqtool(s, "dlq", "redrive", "--all"))["redriven"]
    target = wire.partition_stream(STREAM, 3, 4)
    assert done["stream"] == target and raw.xlen(dead) == 0
    [(entry_id, fields)] = raw.xrange(target)
    assert entry_id == done["new_id"]
    assert fields == {
        **{wire.USER_ID: "alice", wire.MESSAGE: "hi", wire.REQUEST_ID: "r1", wire.TIMESTAMP: "1"},
        wire.REDRIVES: "1",
    }


@pytest.mark.parametrize("where", ["server", "cluster"])
async def test_two_redrives_at_once_send_each_dead_letter_once(where, redis_server, request) -> None:
    """Both redrives list every dead letter first, then race to move them (one oldest first, the other
    newest first, so they collide in the middle): each moves a share, none is sent twice. On the
    cluster the dead-letter stream is in another slot than the queue (claim, XADD, then XDEL)."""
    if where == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        connection, dead = RedisConnection(url=cluster.url, cluster=True), "dlq-elsewhere"
        r = cluster.client(decode_responses=True)
        r.delete(STREAM, dead)
    else:
        connection, dead, r = (
            RedisConnection(url=redis_server.url),
            DEAD,
            redis_server.client(decode_responses=True),
        )
    count = 200
    for i in range(count):
        write_dead_letter(r, dead, f"u{i}", f"r{i}", wire.REASON_MAX_DELIVERIES)
    clients = [connect_any(connection), connect_any(connection)]
    try:
        listed = [await deadletters.find(c, [dead], deadletters.Filter()) for c in clients]
        listed[1].reverse()

        async def redrive_all(client: Any, letters: list[deadletters.DeadLetter]) -> int:
            moved = [await deadletters.redrive(client, letter, STREAM) for letter in letters]
            return sum(new_id is not None for new_id in moved)

        moved = await asyncio.gather(*(redrive_all(c, ls) for c, ls in zip(clients, listed, strict=True)))
    finally:
        for client in clients:
            await client.aclose()
    request_ids = [fields[wire.REQUEST_ID] for _, fields in r.xrange(STREAM)]
    assert sorted(request_ids) == sorted(f"r{i}" for i in range(count))  # every one once
    assert sum(moved) == count and min(moved) > 0  # both took part
    assert r.xlen(dead) == 0
    assert not r.keys(wire.redrive_claim_key(dead, "*"))  # no claim left behind


@pytest.mark.parametrize("dies", ["before its XADD", "after its XADD"])
async def test_a_redrive_across_slots_that_dies_midway_leaves_the_dead_letter_to_send_again(
    dies, redis_cluster, monkeypatch
) -> None:
    """The tool dies (its connection, its pod) around the add to the partition. The dead letter stays
    (never lost); a redrive meanwhile leaves it to the claim of the one that died; once that claim
    has expired a redrive sends it: once in all, or twice with the same request_id."""
    r, dead = redis_cluster.client(decode_responses=True), "dlq-elsewhere"
    r.delete(STREAM, dead)
    write_dead_letter(r, dead, "ada", "r1", wire.REASON_MAX_DELIVERIES)
    client = connect_any(RedisConnection(url=redis_cluster.url, cluster=True))
    try:
        [letter] = await deadletters.find(client, [dead], deadletters.Filter())
        real_xadd = client.xadd

        async def dying_xadd(*args: Any, **kwargs: Any) -> Any:
            if dies == "after its XADD":
                await real_xadd(*args, **kwargs)
            raise ConnectionError("the tool died")

        monkeypatch.setattr(client, "xadd", dying_xadd)
        with pytest.raises(ConnectionError):
            await deadletters.redrive(client, letter, STREAM)
        monkeypatch.undo()
        assert r.xlen(dead) == 1  # still there to redrive
        assert await deadletters.redrive(client, letter, STREAM) is None  # the claim holds it
        claim = wire.redrive_claim_key(dead, letter.entry_id)
        assert 0 < r.pttl(claim) <= deadletters.CLAIM_MS
        r.pexpire(claim, 1)  # the claim's minute is up

        async def redriven() -> str | None:
            return await deadletters.redrive(client, letter, STREAM)

        await eventually_async(redriven, "redriven once the claim expired", timeout=10)
    finally:
        await client.aclose()
    sent = [fields[wire.REQUEST_ID] for _, fields in r.xrange(STREAM)]
    assert sent == ["r1"] * (2 if dies == "after its XADD" else 1)
    assert r.xlen(dead) == 0 and not r.exists(claim)


async def test_a_redriven_message_that_fails_again_lands_back_counted_twice(
    raw, redis_server, settings, tmp_path: Path
) -> None:
    (tmp_path / "failing_handler.py").write_text(FAILING_HANDLER)
    base = {**os.environ, "PYTHONPATH": str(tmp_path)}
    worker = spawn_worker(
        redis_server.url, "w1", tmp_path / "w1.log", base, handler="failing_handler:handle",
        max_deliveries="1", claim_idle_ms="200", block_ms="100",
    )  # fmt: skip
    try:
        send(raw, "ada", "poison", request_id="req-7")
        s = settings()

        async def dead_letter() -> dict[str, Any] | None:
            listed = (await sqtool(s, "dlq", "list"))["dead_letters"]
            return listed[0] if listed else None

        first = await eventually_async(dead_letter, "dead-lettered once", timeout=30)
        assert (first["reason"], first["redrives"], first["dead_lettered"]) == (
            wire.REASON_MAX_DELIVERIES,
            0,
            1,
        )
        await sqtool(s, "dlq", "redrive", "--user", "ada")
        again = await eventually_async(dead_letter, "dead-lettered again", timeout=30)
        assert again["dead_lettered"] == 2
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert (again["user_id"], again["request_id"], again["redrives"]) == ("ada", "req-7", 1)
    assert again["deliveries"] == first["deliveries"] == 1  # counted afresh after the redrive
    assert "RuntimeError: model is down" in again["error"]
    assert raw.xlen(DEAD) == 1


async def test_the_tools_acl_rules_cover_status_and_every_dlq_command_on_a_cluster(redis_cluster) -> None:
    """As a user with exactly ``acl.tool_rules`` (on every node): status, list, show, purge and a redrive
    across slots (a single-partition queue's ``<stream>:dead`` and ``<stream>`` are in different slots).
    Without ``+set`` the redrive is refused before it adds anything, and the dead letter stays."""
    r, dead, user = redis_cluster.client(decode_responses=True), wire.dead_letter_stream(STREAM), "sq-tool"
    assert key_slot(dead.encode()) != key_slot(STREAM.encode())
    r.delete(STREAM, dead)
    granted = acl.tool_rules(acl.QueueKeys(STREAM, cluster=True))
    r.execute_command("ACL", "SETUSER", user, "reset", "on", ">pw", *granted, target_nodes=r.ALL_NODES)
    first = write_dead_letter(r, dead, "ada", "r1", wire.REASON_MAX_DELIVERIES)
    write_dead_letter(r, dead, "bo", "r2", wire.REASON_INVALID_USER_ID)
    s = WorkerSettings(
        redis_url=redis_cluster.url, redis_cluster=True, redis_username=user, redis_password="pw",
        consumer="w1", health_port=0,
    )  # fmt: skip
    try:
        assert (await sqtool(s, "status"))["dead_letters"] == 2
        assert (await sqtool(s, "dlq", "show", first))["dead_letter"]["request_id"] == "r1"
        assert len((await sqtool(s, "dlq", "list"))["dead_letters"]) == 2
        r.execute_command("ACL", "SETUSER", user, "-set", target_nodes=r.ALL_NODES)
        with pytest.raises(ResponseError, match="can't run this command"):
            await sqtool(s, "dlq", "redrive", "--user", "ada")
        assert r.xlen(dead) == 2 and r.xlen(STREAM) == 0
        r.execute_command("ACL", "SETUSER", user, "+set", target_nodes=r.ALL_NODES)
        [done] = (await sqtool(s, "dlq", "redrive", "--user", "ada"))["redriven"]
        assert done["new_id"] is not None and r.xlen(STREAM) == 1
        assert (await sqtool(s, "dlq", "purge", "--all"))["purged"] == 1
    finally:
        r.execute_command("ACL", "DELUSER", user, target_nodes=r.ALL_NODES)
    assert r.xlen(dead) == 0
