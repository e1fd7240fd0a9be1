"""Operator cost with many queues: CPU, Redis commands and round trips, API writes, wake-up time.

One operator (default 1 s poll) watches ``--queues`` StreamQueues (2,000) on one redis-server, all
at minReplicas 0. Two phases are measured: idle (every queue empty and at zero) and mixed (a
``--busy-fraction`` of them get one new message per second, no workers, so their backlogs grow and
they scale to maxReplicas 2; the rest stay idle). Then ``--wake-trials`` idle queues (at rest: only
checked, see docs/operator.md) each get one message, timed until their Deployment's replicas go
0 -> 1. Redis commands are the server's own counters minus the benchmark's XADDs; round trips are
the server's socket reads (``total_reads_processed``: an upper bound, a big pipeline can take two),
including the benchmark's own few per second; API writes are the apiserver's request counters for
StreamQueues and Deployments (the operator's objects). Figures only; nothing is asserted.

``--baseline DIR`` first runs the same measurement with the operator (and worker package) of another
source tree, e.g. a ``git worktree`` of an older commit, and prints both in one table.

    python -m bench.operator_cost [--queues 2000] [--seconds 30] [--baseline /tmp/wt-old]
    python -m bench.operator_cost --queues 100 --seconds 10 --wake-trials 3   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from kubernetes import client as k8s
from streamqueue_harness.eventually import eventually
from streamqueue_operator.models import GROUP, VERSION

from bench.common import print_table, process_cpu_seconds
from bench.operator_reaction import CGROUP, NAMESPACE, DeploymentWatch, Environment, environment

WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE", "APPLY"}
_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


@dataclass(frozen=True)
class Counters:
    at: float
    cpu_seconds: float
    redis_calls: int
    redis_reads: int
    xadds: int
    api_writes: int


def _api_writes(env: Environment) -> int:
    """Write requests on StreamQueues (incl. status) and Deployments (not their status) so far."""
    total = 0
    for line in env.plane.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        ours = labels.get("resource") == "streamqueues" or (
            labels.get("resource") == "deployments" and not labels.get("subresource")
        )
        if ours and labels.get("verb") in WRITE_VERBS:
            total += int(float(match["value"]))
    return total


def snapshot(env: Environment, xadds: int) -> Counters:
    r = env.redis.client()
    calls = sum(int(v["calls"]) for v in r.info("commandstats").values())
    reads = int(r.info("stats")["total_reads_processed"])
    return Counters(
        time.monotonic(), process_cpu_seconds(env.operator.pid), calls, reads, xadds, _api_writes(env)
    )


def create_queues(env: Environment, count: int) -> list[str]:
    r = env.redis.client()
    names = [f"q{i:04d}" for i in range(count)]
    for name in names:
        r.xgroup_create(f"{name}-stream", CGROUP, id="0", mkstream=True)
    docs = [
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "StreamQueue",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "redis": {"url": env.redis.url},
                "stream": f"{name}-stream",
                # No pod ever starts here: coldStartSeconds 0 keeps the cold-start hold out of it.
                "scaling": {"minReplicas": 0, "maxReplicas": 2, "coldStartSeconds": 0},
            },
        }
        for name in names
    ]
    env.plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs), timeout=600)
    return names


def wait_all_observed(env: Environment, count: int, timeout: float = 600) -> float:
    custom = k8s.CustomObjectsApi(env.api)
    began = time.monotonic()

    def all_observed() -> bool:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "streamqueues")["items"]
        return sum(1 for i in items if "backlog" in i.get("status", {})) >= count

    eventually(all_observed, f"a status on all {count} StreamQueues", timeout, 1, TimeoutError)
    return time.monotonic() - began


class Writer:
    """One message per queue per second, pipelined (the busy phase's load)."""

    def __init__(self, env: Environment, names: list[str]) -> None:
        self.env, self.names, self.sent = env, names, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        r = self.env.redis.client()
        while not self._stop.wait(1.0):
            pipe = r.pipeline(transaction=False)
            for name in self.names:
                pipe.xadd(f"{name}-stream", {"user_id": "u", "message": "m", "timestamp": "0"})
            pipe.execute()
            self.sent += len(self.names)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wake_times(env: Environment, names: list[str]) -> list[float]:
    """Seconds from one message on an idle queue at zero to its Deployment's replicas above zero.

    The messages land at evenly spread points of the poll cycle (golden-ratio sequence), as in
    operator_reaction, so lucky and unlucky phases both count.
    """
    r, times = env.redis.client(), []
    ups = DeploymentWatch(env.api, lambda d: d.metadata.name if d.spec.replicas else None)  # first > 0
    try:
        for trial, name in enumerate(names, 1):
            time.sleep(1.0 + (trial * 0.6180339887) % 1.0)
            r.xadd(f"{name}-stream", {"user_id": "u", "message": "m", "timestamp": "0"})
            written = time.perf_counter()
            try:
                times.append(ups.wait(f"{name}-worker", timeout=30) - written)
            except TimeoutError:
                times.append(math.inf)  # not woken within 30 s: shown as inf, the run goes on
    finally:
        ups.stop()
    return times


@dataclass(frozen=True)
class Result:
    operator: str
    idle: tuple[Counters, Counters]
    mixed: tuple[Counters, Counters]
    wakes: list[float]
    lease_losses: int  # "stopped leading" in the operator's log: its polls stopped meanwhile


def measure(label: str, args: argparse.Namespace) -> Result:
    """One operator's run: create the queues, then the idle phase, the mixed phase and the wake trials."""
    busy = round(args.queues * args.busy_fraction)
    with environment() as env:
        names = create_queues(env, args.queues)
        ready_after = wait_all_observed(env, args.queues, args.ready_timeout)
        print(f"{label}: {args.queues} StreamQueues created and observed in {ready_after:.0f}s", flush=True)
        time.sleep(10)  # let creation-time writes settle
        idle = snapshot(env, 0)
        time.sleep(args.seconds)
        idle_end = snapshot(env, 0)
        with Writer(env, names[:busy]) as writer:
            time.sleep(5)
            mixed = snapshot(env, writer.sent)
            time.sleep(args.seconds)
            mixed_end = snapshot(env, writer.sent)
        wakes = wake_times(env, names[busy : busy + args.wake_trials])
        losses = env.operator.logs().count("stopped leading")
    return Result(label, (idle, idle_end), (mixed, mixed_end), wakes, losses)


def _row(result: Result, phase: str, queues: int) -> list[object]:
    a, b = result.idle if phase == "idle" else result.mixed
    span = b.at - a.at
    redis_calls = (b.redis_calls - a.redis_calls) - (b.xadds - a.xadds) - 4  # minus the INFO calls
    return [
        result.operator,
        phase,
        f"{100 * (b.cpu_seconds - a.cpu_seconds) / span:.1f}",
        f"{redis_calls / span / queues:.2f}",
        f"{(b.redis_reads - a.redis_reads) / span / queues:.3f}",
        f"{(b.api_writes - a.api_writes) / span:.2f}",
    ]


@contextlib.contextmanager
def source_tree(tree: Path) -> Iterator[None]:
    """Run the operator subprocess from ``tree``'s packages (PYTHONPATH wins over the editable installs)."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(str(tree / p) for p in ("operator", "worker"))
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench operator_cost", description="operator cost at scale (see module doc)"
    )
    parser.add_argument("--queues", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each measured phase")
    parser.add_argument("--busy-fraction", type=float, default=0.1, help="queues loaded in the mixed phase")
    parser.add_argument("--wake-trials", type=int, default=10, help="idle queues woken by one message")
    parser.add_argument("--baseline", type=Path, help="source tree whose operator is measured first")
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=1800.0,
        help="seconds to wait for every queue's first status (creation is API-server bound: about 3 "
        "queues/s on the shared 2-core machine, each a Deployment, a PodDisruptionBudget and Events)",
    )
    args = parser.parse_args(argv)
    results = []
    if args.baseline:
        with source_tree(args.baseline):
            results.append(measure(f"baseline ({args.baseline.name})", args))
    results.append(measure("this tree", args))
    print(f"{args.queues} queues, {round(args.queues * args.busy_fraction)} busy in the mixed phase")
    rows = [_row(r, phase, args.queues) for r in results for phase in ("idle", "mixed")]
    print_table(
        ["operator", "phase", "CPU %", "Redis cmds/queue/s", "round trips/queue/s", "API writes/s"], rows
    )
    wake_rows = [
        [r.operator, len(r.wakes), f"{statistics.median(r.wakes):.2f}", f"{max(r.wakes):.2f}", r.lease_losses]
        for r in results
        if r.wakes
    ]
    print_table(["operator", "wake trials", "median s", "max s", "Lease losses"], wake_rows)
    print("API writes: StreamQueue patches (status, finalizer, annotations) + Deployment create/patch")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
