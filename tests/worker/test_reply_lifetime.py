"""Reply stream lifetime against a real redis-server: read plainly, a stream expires; read through a
consumer group, it never does, since an expiry would delete the group with the key.

Each test starts from a stream that already carries a TTL when its user's group is created (the
client attached after earlier replies), the one case a check at group-creation time cannot cover:
the next reply whose lifetime step is due must clear that TTL. A stream's step runs at most once per
``lifetimes.refresh_s(ttl)`` (a tenth of the TTL): the tests wait for it on the TTL Redis counts down.
"""

from __future__ import annotations

import pytest
import redis
from streamqueue import wire
from streamqueue.handlers import Message
from streamqueue.worker.lifetimes import refresh_s
from streamqueue_harness.eventually import eventually_async

from tests.worker.conftest import RunningWorkers, acl_user, group_settled, replies, send

TTL = 10  # the lifetime step holds for a second


async def _step_due(raw: redis.Redis, user_id: str) -> None:
    """Wait until the stream's lifetime step is due again: the TTL its last step set has run down
    by more than the step's refresh period."""
    due_ms = (TTL - refresh_s(TTL)) * 1000 - 100
    await eventually_async(lambda: 0 < raw.pttl(_key(user_id)) < due_ms, "the next lifetime step due", 15)


def _key(user_id: str) -> str:
    return wire.reply_stream(wire.DEFAULT_REPLY_PREFIX, user_id)


async def _answered(raw: redis.Redis, *users_and_ids: tuple[str, str]) -> None:
    for user_id, request_id in users_and_ids:
        send(raw, user_id, "hi", request_id=request_id)
    await eventually_async(lambda: group_settled(raw), "the replies committed", timeout=15)


@pytest.mark.parametrize("commit", ["script", "pipeline"])
async def test_a_reply_stream_with_a_consumer_group_loses_its_ttl_and_others_keep_theirs(
    raw, settings, workers: RunningWorkers, commit: str
) -> None:
    overrides = acl_user(raw, "noscript", "-@scripting") if commit == "pipeline" else {}
    await workers.start(settings(reply_ttl_seconds=TTL, **overrides))
    await _answered(raw, ("quinn", "q0"), ("rita", "r0"))
    assert 0 < raw.ttl(_key("quinn")) <= TTL

    raw.xgroup_create(_key("quinn"), "wsgroup_quinn", id="0")  # quinn's client attaches a group now
    await _step_due(raw, "quinn")
    await _answered(raw, ("quinn", "q1"), ("rita", "r1"))
    assert raw.ttl(_key("quinn")) == -1  # persistent: the group can no longer expire with the key
    assert 0 < raw.ttl(_key("rita")) <= TTL  # read plainly: still expires
    [(_, entries)] = raw.xreadgroup("wsgroup_quinn", "consumer_quinn", {_key("quinn"): ">"})
    assert [fields[wire.REQUEST_ID] for _, fields in entries] == ["q0", "q1"]


async def test_chunks_of_a_failed_stream_read_through_a_group_do_not_expire(
    raw, settings, workers: RunningWorkers
) -> None:
    async def breaks_on_request(msg: Message):
        yield "partial "
        if msg.message == "tell me":
            raise RuntimeError("model went away")

    worker = await workers.start(settings(stream_replies=True, reply_ttl_seconds=TTL), breaks_on_request)
    await _answered(raw, ("sam", "s0"))
    raw.xgroup_create(_key("sam"), "wsgroup_sam", id="0")
    await _step_due(raw, "sam")
    send(raw, "sam", "tell me", request_id="s1")
    await eventually_async(
        lambda: worker.metrics.registry.get_sample_value("streamqueue_handler_failures_total") == 1,
        "the failed handler",
        timeout=15,
    )
    assert [(f.get(wire.CHUNK), f[wire.REQUEST_ID]) for f in replies(raw, "sam")] == [
        ("partial ", "s0"), (None, "s0"), ("partial ", "s1"),
    ]  # fmt: skip
    assert raw.ttl(_key("sam")) == -1  # the first chunk's write already cleared the TTL


async def test_an_acl_without_persist_still_commits_and_says_why(
    raw, settings, workers: RunningWorkers, caplog
) -> None:
    await workers.start(settings(reply_ttl_seconds=TTL, **acl_user(raw, "nopersist", "-persist")))
    await _answered(raw, ("tess", "t0"))
    raw.xgroup_create(_key("tess"), "wsgroup_tess", id="0")
    await _step_due(raw, "tess")
    await _answered(raw, ("tess", "t1"))  # settled: the XACK ran although PERSIST was refused
    assert [r[wire.REQUEST_ID] for r in replies(raw, "tess")] == ["t0", "t1"]
    refused = f"PERSIST {_key('tess')} (read through a consumer group)"
    await eventually_async(
        lambda: refused in caplog.text, "the refusal logged (after the script returns)", timeout=15
    )


async def test_the_lifetime_step_runs_once_per_refresh_period(raw, settings, workers: RunningWorkers) -> None:
    """Within its refresh period a stream's replies skip the step: a group created then leaves the
    TTL alone (no XINFO GROUPS, no PERSIST); the first reply after it clears the TTL."""
    await workers.start(settings(reply_ttl_seconds=TTL))
    await _answered(raw, ("uma", "u0"))
    raw.xgroup_create(_key("uma"), "wsgroup_uma", id="0")
    await _answered(raw, ("uma", "u1"))
    if raw.pttl(_key("uma")) > (TTL - refresh_s(TTL)) * 1000:  # still within the period (slow machine: skip)
        assert raw.ttl(_key("uma")) > 0
    await _step_due(raw, "uma")
    await _answered(raw, ("uma", "u2"))
    assert raw.ttl(_key("uma")) == -1
