"""Operator HA on the local control plane: two operator processes, one Lease, one writer.

The chart's default election timings (``values.yaml``: lease 3 s, renew deadline 2 s, retry 0.5 s),
so what is tested is what a user installs; ``python -m bench ha`` measures the same failover.
Which replica wrote is read from the API server itself: each process writes with its own field
manager (``streamqueue-operator_<identity>``), recorded in the objects' managedFields.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from streamqueue_harness import operatorha as ha
from streamqueue_harness.eventually import eventually
from streamqueue_harness.redis_server import RedisServer

from tests.operator.queues import CGROUP, STREAM, Queues, metric, push

pytestmark = pytest.mark.kube

CHART_TIMING = ha.chart_timing()
TIMING = ha.timing_args(CHART_TIMING)
LEASE = "streamqueue-operator"


def holder(sq: Queues) -> str:
    lease = k8s.CoordinationV1Api(sq.api).read_namespaced_lease(LEASE, sq.namespace)
    return lease.spec.holder_identity or ""


def writers(sq: Queues, name: str) -> dict[str, datetime]:
    """Operator identity -> time of its last write, on the worker Deployment and the StreamQueue's status."""
    deployment = k8s.AppsV1Api(sq.api).read_namespaced_deployment(f"{name}-worker", sq.namespace)
    return ha.writers([sq.api.sanitize_for_serialization(deployment), sq.get(name)])


def test_one_leader_scales_and_a_standby_takes_over_when_it_is_killed(
    sq: Queues, redis_server: RedisServer, streamqueue_crd: dict[str, Any], tmp_path: Path
) -> None:
    r = redis_server.client()
    r.xgroup_create(STREAM, CGROUP, id="0", mkstream=True)
    with ha.replicas(sq.plane, sq.namespace, tmp_path, 2, TIMING) as group:
        leader, (standby,) = ha.elected(group)
        assert holder(sq) == leader.identity()
        push(r, 7)
        sq.apply("ha", minReplicas=1, maxReplicas=6, coldStartSeconds=0)
        eventually(lambda: sq.replicas("ha") == 2, "the leader scales to ceil(7/5) = 2", timeout=30)
        eventually(lambda: sq.get("ha").get("status", {}).get("backlog") == 7, "status", timeout=15)
        assert set(writers(sq, "ha")) == {leader.identity()}, "only the leader writes"
        assert not metric(standby.port, "streamqueue_operator_writes_total", {"outcome": "sent"})

        leader.proc.proc.kill()  # SIGKILL: no release, the standby waits for the Lease to expire
        killed = time.monotonic()
        leader.proc.proc.wait(timeout=10)
        push(r, 10)  # 17 entries: 4 replicas
        eventually(lambda: sq.replicas("ha") == 4, "the standby's first scale", timeout=30)
        took = time.monotonic() - killed
        lease, retry = CHART_TIMING["leaseDuration"], CHART_TIMING["retryPeriod"]
        print(f"kill -9 of the leader -> the standby scaled after {took:.1f} s (lease duration {lease:g} s)")
        assert standby.leading() and holder(sq) == standby.identity()
        assert took < lease + 1.2 * retry + 5, took  # lease + a jittered retry + a poll and a slow API


def test_a_paused_leader_writes_nothing_after_its_lease_ran_out(
    sq: Queues, redis_server: RedisServer, streamqueue_crd: dict[str, Any], tmp_path: Path
) -> None:
    r = redis_server.client()
    r.xgroup_create(STREAM, CGROUP, id="0", mkstream=True)
    push(r, 7)
    sq.apply("paused", minReplicas=1, maxReplicas=6, coldStartSeconds=0)
    with ha.replicas(sq.plane, sq.namespace, tmp_path, 2, TIMING) as group:
        leader, (standby,) = ha.elected(group)
        eventually(lambda: sq.replicas("paused") == 2, "the leader scales", timeout=30)
        os.kill(leader.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        push(r, 10)  # the paused leader's state is now stale: it would scale to 4 too
        eventually(lambda: standby.leading(), "the standby takes over", timeout=30)
        print(f"SIGSTOP of the leader -> standby leads after {time.monotonic() - stopped:.1f} s")
        eventually(lambda: sq.replicas("paused") == 4, "the new leader scales", timeout=30)
        resumed = datetime.now(UTC).replace(microsecond=0)
        os.kill(leader.proc.pid, signal.SIGCONT)
        push(r, 10)  # 27 entries: 6 replicas, a decision both would want to write
        eventually(lambda: sq.replicas("paused") == 6, "the leader scales again", timeout=30)
        eventually(lambda: metric(leader.port, "streamqueue_operator_leader", {}) == 0, "old leader's gauge")
        late = {who: at for who, at in writers(sq, "paused").items() if at >= resumed}
        assert set(late) <= {standby.identity()}, f"the old leader wrote after SIGCONT: {late}"
        assert holder(sq) == standby.identity()
        refused = metric(leader.port, "streamqueue_operator_writes_total", {"outcome": "refused"})
        print(f"the resumed old leader's refused writes: {refused or 0:.0f}")


def test_a_stopped_leader_releases_the_lease_so_the_standby_takes_over_at_once(
    sq: Queues, streamqueue_crd: dict[str, Any], tmp_path: Path
) -> None:
    with ha.replicas(sq.plane, sq.namespace, tmp_path, 2, TIMING) as group:
        leader, (standby,) = ha.elected(group)
        stopping = time.monotonic()
        leader.proc.stop()  # SIGTERM: kopf stops the daemons, then the Lease is released
        eventually(lambda: holder(sq) == standby.identity(), "the standby holds the Lease", timeout=30)
        took = time.monotonic() - stopping
        print(f"SIGTERM of the leader -> the standby holds the Lease after {took:.1f} s")
        expected = {
            f"{leader.identity()} became leader",
            f"{leader.identity()} stopped leading (released the Lease)",
            f"{standby.identity()} became leader",  # posted just after the Lease was taken
        }
        eventually(lambda: expected <= lease_events(sq), "the LeaderElection Events on the Lease", timeout=15)


def lease_events(sq: Queues) -> set[str]:
    events = k8s.CoreV1Api(sq.api).list_namespaced_event(
        sq.namespace, field_selector=f"involvedObject.kind=Lease,involvedObject.name={LEASE}"
    )
    return {e.message for e in events.items if e.reason == "LeaderElection"}
