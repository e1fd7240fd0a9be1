"""The election's timing (pure, on an injected clock), the fenced writes and the operator's settings."""

from __future__ import annotations

import asyncio

import pytest
from kubernetes import client as k8s
from streamqueue_operator import settings
from streamqueue_operator.kubeapi import Cluster, NotLeader
from streamqueue_operator.leader import Election, Record, Timing

TIMING = Timing(lease_duration=15, renew_deadline=10, retry_period=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def other(renew_time: str = "t0") -> Record:
    return Record("other_1", 15, "t0", renew_time, 3)


def test_a_leader_stops_at_its_renew_deadline_before_a_standby_may_take_over() -> None:
    clock = Clock()
    leader, standby = Election("a", TIMING, clock), Election("b", TIMING, clock)
    record = leader.next_record(None, wall=0)
    leader.renewed(clock.now, record)  # the renewal request started now and succeeded
    standby.observe(record)  # the standby sees it a moment later at the earliest
    clock.now += 9.99
    assert leader.leading() and not standby.may_take(record)
    clock.now += 0.01
    assert not leader.leading() and leader.fence_remaining() == 0
    clock.now += 4.99  # renew_deadline < lease_duration: the fence closed 5 s before expiry
    assert not standby.may_take(record)
    clock.now += 0.01
    assert standby.may_take(record)


def test_expiry_counts_from_when_the_record_last_changed_on_the_observer_clock() -> None:
    clock = Clock()
    standby = Election("b", TIMING, clock)
    standby.observe(other("t0"))
    clock.now += 14
    standby.observe(other("t1"))  # renewed: the 15 s start again
    clock.now += 14
    assert not standby.may_take(other("t1"))
    clock.now += 1
    assert standby.may_take(other("t1"))


def test_a_released_or_own_lease_is_taken_at_once_and_a_new_holder_counts_a_transition() -> None:
    clock = Clock()
    election = Election("b", TIMING, clock)
    released = Record("", 1, None, "t0", 3)
    election.observe(released)
    assert election.may_take(released)
    taken = election.next_record(released, wall=0)
    assert (taken.holder, taken.transitions, taken.duration_seconds) == ("b", 3, 15)
    election.observe(other())
    assert election.next_record(other(), wall=0).transitions == 4
    renewed = election.next_record(taken, wall=60)
    assert (renewed.acquire_time, renewed.transitions) == (taken.acquire_time, 3)
    assert renewed.renew_time == "1970-01-01T00:01:00.000000Z"


def test_the_pause_between_attempts() -> None:
    clock = Clock()
    election = Election("a", TIMING, clock)
    assert election.pause(0.0) == 2 and election.pause(1.0) == pytest.approx(2.4)  # standby: jittered
    election.renewed(clock.now, election.next_record(None, wall=0))
    clock.now += 9
    assert election.pause(0.5) == pytest.approx(1)  # a leader wakes when its fence closes


def test_a_write_is_refused_before_any_request_when_not_leading() -> None:
    cluster = Cluster(k8s.ApiClient(k8s.Configuration(host="http://127.0.0.1:9")), leading=lambda: False)
    for write in (
        cluster.scale("ns", "d", 3),
        cluster.patch_status("ns", "q", {}),
        cluster.annotate_pod("ns", "p", "k", "v"),
    ):
        with pytest.raises(NotLeader):
            asyncio.run(write)


def test_a_write_whose_fence_closed_while_it_waited_for_its_thread_is_not_sent() -> None:
    """The check on the event loop passes, then the process is paused (or the call queued) past the
    renew deadline: the request must not go out when its thread finally runs it (the two-node test's
    frozen leader wrote after SIGCONT before this second check)."""
    checks = iter([True])  # leading at the first check, not at any later one
    cluster = Cluster(
        k8s.ApiClient(k8s.Configuration(host="http://127.0.0.1:9")), lambda: next(checks, False)
    )
    sent: list[str] = []
    cluster.apps.patch_namespaced_deployment = lambda *a, **k: sent.append("scale")  # type: ignore[method-assign]
    cluster.custom.patch_namespaced_custom_object_status = lambda *a, **k: sent.append("status")  # type: ignore[method-assign]
    cluster.core.patch_namespaced_pod = lambda *a, **k: sent.append("pod")  # type: ignore[method-assign]
    for write in (
        lambda: cluster.scale("ns", "d", 3),
        lambda: cluster.patch_status("ns", "q", {}),
        lambda: cluster.annotate_pod("ns", "p", "k", "v"),
    ):
        checks = iter([True])
        with pytest.raises(NotLeader):
            asyncio.run(write())
    assert sent == []


def test_settings_come_from_flags_then_environment_then_defaults() -> None:
    env = {
        "POD_NAMESPACE": "ops",
        "STREAMQUEUE_OPERATOR_RETRY_PERIOD": "1",
        "STREAMQUEUE_OPERATOR_NAMESPACE": "x,y",
    }
    parsed = settings.parse(["--lease-duration=4", "--renew-deadline=3", "--no-leader-election"], env)
    assert parsed.namespace == ("x", "y") and parsed.lease_namespace == "ops"
    assert (parsed.lease_duration, parsed.renew_deadline, parsed.retry_period) == (4, 3, 1)
    assert not parsed.leader_election and parsed.status_min_interval == 10
    assert settings.parse(["--namespace=a"], {}).lease_namespace == "a"
    for bad in (["--all-namespaces", "--namespace=a"], [], ["--namespace=a", "--renew-deadline=20"]):
        with pytest.raises(SystemExit):
            settings.parse(bad, {})
