"""Operator reaction time: backlog written to Redis → worker Deployment's replicas patched.

Each trial XADDs ``targetBacklogPerReplica`` entries (one replica's worth) to a queue and times how
long until a watch on the Deployment sees ``spec.replicas`` go up by one. Default settings
(``pollIntervalSeconds: 1``) are measured, and, in the same run, a 5 s poll interval as the
slow-polling baseline (KEDA's redis-streams scaler polls every 30 s and the HPA syncs every 15 s on
top). Figures only; nothing is asserted.

    python -m bench operator_reaction [--trials 20] [--baseline-trials 6]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes import client as k8s
from kubernetes import watch
from streamqueue_harness.controlplane import ControlPlane
from streamqueue_harness.operatorproc import OperatorProcess, install_crd
from streamqueue_harness.redis_server import RedisServer
from streamqueue_operator.models import GROUP, VERSION

from bench.common import print_table

NAMESPACE = "bench"
STREAM, CGROUP = "user_messages_queue", "ai_service_group"
PER_REPLICA = 5  # the default targetBacklogPerReplica


@dataclass
class Environment:
    plane: ControlPlane
    redis: RedisServer
    api: k8s.ApiClient
    operator: OperatorProcess


@contextlib.contextmanager
def environment(*operator_args: str, start_operator: bool = True) -> Iterator[Environment]:
    """Control plane + redis-server + CRD + namespace + the operator watching it (all torn down after).

    ``start_operator=False``: the operator is configured but not started (bench.ha runs its own replicas)."""
    workdir = Path(tempfile.mkdtemp(prefix="sq-bench-"))
    with ControlPlane(workdir / "cluster") as plane, RedisServer() as redis_server:
        install_crd(plane)
        plane.kubectl("create", "namespace", NAMESPACE)
        plane.wait_for_default_serviceaccount(NAMESPACE)
        args = ("--log-level=warning", *operator_args)
        operator = OperatorProcess(plane.kubeconfig, f"--namespace={NAMESPACE}", workdir, *args)
        with plane.api_client() as api, operator if start_operator else contextlib.nullcontext():
            yield Environment(plane, redis_server, api, operator)


def apply_queue(env: Environment, name: str, stream: str, **scaling: Any) -> None:
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "StreamQueue",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"redis": {"url": env.redis.url}, "stream": stream, "scaling": scaling},
    }
    env.plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))


class DeploymentWatch:
    """When each value ``key`` reads off the namespace's Deployments (or Pods or Leases: ``kind``) was
    first seen (one watch, not polling). ``key`` maps an object to what is recorded, or None for a state
    not worth recording."""

    def __init__(
        self,
        api: k8s.ApiClient,
        key: Callable[[Any], Hashable | None],
        namespace: str = NAMESPACE,
        kind: str = "deployment",
        **selectors: str,
    ) -> None:
        self.seen: dict[Hashable, float] = {}
        self._key = key
        self._cond = threading.Condition()
        self._watch = watch.Watch()
        lister = {
            "deployment": k8s.AppsV1Api(api).list_namespaced_deployment,
            "pod": k8s.CoreV1Api(api).list_namespaced_pod,
            "lease": k8s.CoordinationV1Api(api).list_namespaced_lease,
        }[kind]
        self._stream = self._watch.stream(lister, namespace, **selectors)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        with contextlib.suppress(urllib3.exceptions.HTTPError, OSError):  # the cluster stops at the end
            for event in self._stream:
                obj = event.get("object") if event else None  # None once the watch is stopped
                value = self._key(obj) if obj is not None else None
                if value is not None:
                    with self._cond:
                        self.seen.setdefault(value, time.perf_counter())
                        self._cond.notify_all()

    def wait(self, value: Hashable, timeout: float) -> float:
        """The perf_counter time ``value`` was first seen; TimeoutError if not within ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: value in self.seen, timeout):
                raise TimeoutError(f"no Deployment reached {value!r} within {timeout}s")
            return self.seen[value]

    def first(self, matches: Callable[[Any], bool], timeout: float) -> tuple[Any, float]:
        """The earliest seen value ``matches`` accepts, and when; waits up to ``timeout`` for one."""

        def found() -> list[tuple[float, Any]]:
            return [(at, value) for value, at in self.seen.items() if matches(value)]

        with self._cond:
            if not self._cond.wait_for(found, timeout):
                raise TimeoutError(f"no watched object matched within {timeout}s")
            at, value = min(found(), key=lambda seen: seen[0])
            return value, at

    def stop(self) -> None:
        self._watch.stop()


def measure(env: Environment, name: str, trials: int, poll: float) -> list[float]:
    """Reaction times (seconds) of ``trials`` one-replica backlog steps on a fresh queue."""
    stream = f"{name}-stream"
    r = env.redis.client()
    r.xgroup_create(stream, CGROUP, id="0", mkstream=True)
    # No pod ever runs here, so none is Ready: coldStartSeconds 0 keeps the cold-start hold (which
    # waits for starting pods before adding more) out of a measurement of the reaction itself.
    apply_queue(
        env, name, stream, minReplicas=1, maxReplicas=trials + 1, pollIntervalSeconds=poll, coldStartSeconds=0
    )
    # Each spec.replicas value of this queue's Deployment, when first seen.
    deployment = f"metadata.name={name}-worker"
    watcher = DeploymentWatch(env.api, lambda d: d.spec.replicas, field_selector=deployment)
    try:
        watcher.wait(1, timeout=60)
        _push(
            r, stream
        )  # one replica's worth: still 1 replica; each trial then adds one more replica's worth
        time.sleep(2 * poll)
        times = []
        for trial in range(1, trials + 1):
            # Writes land at evenly spread points of the poll cycle (golden-ratio sequence), measured from
            # the previous patch, which follows a poll by a few ms: a fair mix of lucky and unlucky phases.
            time.sleep(poll * ((trial * 0.6180339887) % 1.0))
            _push(r, stream)
            written = time.perf_counter()
            times.append(watcher.wait(trial + 1, timeout=10 * poll + 30) - written)
        return times
    finally:
        watcher.stop()


def _push(r: Any, stream: str) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(PER_REPLICA):
        pipe.xadd(stream, {"user_id": f"user{i}", "message": "m", "timestamp": "0"})
    pipe.execute()


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench operator_reaction", description="operator reaction time (see module doc)"
    )
    parser.add_argument("--trials", type=int, default=20, help="trials with default settings (1 s poll)")
    parser.add_argument("--baseline-trials", type=int, default=6, help="trials with a 5 s poll (0 skips)")
    args = parser.parse_args(argv)
    with environment() as env:
        results = {"default (poll 1 s)": measure(env, "default", args.trials, 1.0)}
        if args.baseline_trials:
            results["slow poll (5 s)"] = measure(env, "slow", args.baseline_trials, 5.0)
    rows = [
        [label, len(t), f"{statistics.median(t):.2f}", f"{_p95(t):.2f}", f"{max(t):.2f}"]
        for label, t in results.items()
    ]
    print_table(["setting", "trials", "median s", "p95 s", "max s"], rows)
    default = results["default (poll 1 s)"]
    print(f"target: p95 <= 3 s with default settings -> {'met' if _p95(default) <= 3 else 'NOT met'}")
    if "slow poll (5 s)" in results:
        ratio = statistics.median(results["slow poll (5 s)"]) / statistics.median(default)
        print(f"slow-poll median / default median = {ratio:.1f}x")
    print("KEDA defaults for comparison (not measured here): 30 s poll + 15 s HPA sync -> up to ~45 s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
