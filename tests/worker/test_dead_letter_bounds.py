"""Dead-letter streams are bounded (deadLetterMaxLen) and what the bound trims is counted, and a new
group starts where groupStartId says: against a real redis-server, with in-process Workers."""

from __future__ import annotations

import pytest
from streamqueue import wire
from streamqueue_harness.eventually import eventually_async

from tests.worker.conftest import STREAM, acl_user, answered_request_ids, group_settled, send

DEAD = wire.dead_letter_stream(STREAM)
# Redis trims MAXLEN ~ in whole stream nodes (stream-node-max-entries, 100 by default), so a bound of
# 10 is first enforced once the stream holds 110 entries.
INVALID = 250
MAX_LEN = 10


@pytest.mark.parametrize("commit", ["script", "pipeline"])
async def test_dead_letters_are_trimmed_to_their_bound_and_every_trimmed_one_is_counted(
    raw, settings, workers, commit
) -> None:
    overrides = acl_user(raw, "noscript", "-@scripting") if commit == "pipeline" else {}
    worker = await workers.start(settings(dead_letter_max_len=MAX_LEN, **overrides))
    pipe = raw.pipeline(transaction=False)
    for i in range(INVALID):
        pipe.xadd(STREAM, {wire.MESSAGE: f"no user {i}"})  # invalid: dead-lettered at once
    pipe.execute()
    await eventually_async(lambda: group_settled(raw), "every invalid entry dead-lettered", timeout=30)

    def trimmed() -> float | None:
        return worker.metrics.registry.get_sample_value("streamqueue_dead_letters_trimmed_total")

    kept = raw.xlen(DEAD)
    assert kept < MAX_LEN + 100  # about MAX_LEN: at most one stream node more
    await eventually_async(lambda: trimmed() == INVALID - kept, "the trimmed dead letters counted", timeout=5)
    assert raw.xinfo_stream(DEAD)["last-generated-id"] == raw.xrevrange(DEAD, count=1)[0][0]  # newest kept


@pytest.mark.parametrize(("start_id", "served"), [("0", ["new", "old-0", "old-1"]), ("$", ["new"])])
async def test_a_new_group_starts_where_group_start_id_says(raw, settings, workers, start_id, served) -> None:
    send(raw, "ada", "history", request_id="old-0")
    send(raw, "ada", "history", request_id="old-1")
    await workers.start(settings(group_start_id=start_id))
    send(raw, "ada", "after the group", request_id="new")
    await eventually_async(
        lambda: "new" in answered_request_ids(raw, ["ada"]), "the new entry answered", timeout=15
    )
    await eventually_async(lambda: group_settled(raw), "nothing left for the group", timeout=15)
    assert sorted(answered_request_ids(raw, ["ada"])) == served


async def test_an_existing_group_keeps_its_position_whatever_group_start_id_says(
    raw, settings, workers
) -> None:
    send(raw, "bo", "before", request_id="before")
    raw.xgroup_create(STREAM, settings().group, id="0")
    await workers.start(settings(group_start_id="$"))
    await eventually_async(lambda: group_settled(raw), "the existing group's backlog served", timeout=15)
    assert answered_request_ids(raw, ["bo"]) == ["before"]
