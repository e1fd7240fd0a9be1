"""Operator cost with many queues: CPU, Redis calls/s and API writes/s for 200 StreamQueues.

One operator (default 1 s poll) watches 200 StreamQueues on one redis-server. Two phases are
measured: idle (every queue empty and steady) and busy (one new message per queue per second, no
workers, so backlogs grow and queues scale to maxReplicas 2). Redis calls are the server's own
command counters minus the benchmark's XADDs; API writes are the apiserver's request counters for
StreamQueues and Deployments (the operator's objects). Figures only; nothing is asserted.

    python -m bench operator_cost [--queues 200] [--seconds 30]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from kubernetes import client as k8s
from streamqueue_harness.eventually import eventually
from streamqueue_operator.models import GROUP, VERSION

from bench.common import print_table
from bench.operator_reaction import CGROUP, NAMESPACE, Environment, environment

WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE", "APPLY"}
_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


@dataclass(frozen=True)
class Counters:
    at: float
    cpu_seconds: float
    redis_calls: int
    xadds: int
    api_writes: int


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    stats = env.redis.client().info("commandstats")
    calls = sum(int(v["calls"]) for v in stats.values())
    return Counters(time.monotonic(), _cpu_seconds(env.operator.pid), calls, xadds, _api_writes(env))


def create_queues(env: Environment, count: int) -> list[str]:
    r = env.redis.client()
    names = [f"q{i:03d}" for i in range(count)]
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
                "scaling": {"minReplicas": 0, "maxReplicas": 2},
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


def _row(phase: str, a: Counters, b: Counters, queues: int) -> list[object]:
    span = b.at - a.at
    redis_calls = (b.redis_calls - a.redis_calls) - (b.xadds - a.xadds) - 2  # minus INFO calls
    return [
        phase,
        f"{100 * (b.cpu_seconds - a.cpu_seconds) / span:.1f}",
        f"{redis_calls / span:.0f}",
        f"{redis_calls / span / queues:.2f}",
        f"{(b.api_writes - a.api_writes) / span:.2f}",
        f"{span:.0f}",
    ]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench operator_cost", description="operator cost at scale"
    )
    parser.add_argument("--queues", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each measured phase")
    args = parser.parse_args(argv)
    with environment() as env:
        names = create_queues(env, args.queues)
        ready_after = wait_all_observed(env, args.queues)
        print(f"{args.queues} StreamQueues created and observed in {ready_after:.0f}s")
        time.sleep(10)  # let creation-time writes settle
        idle_a = snapshot(env, 0)
        time.sleep(args.seconds)
        idle_b = snapshot(env, 0)
        with Writer(env, names) as writer:
            time.sleep(5)
            busy_a = snapshot(env, writer.sent)
            time.sleep(args.seconds)
            busy_b = snapshot(env, writer.sent)
    print_table(
        ["phase", "operator CPU %", "Redis calls/s", "per queue", "API writes/s", "seconds"],
        [_row("idle", idle_a, idle_b, args.queues), _row("busy", busy_a, busy_b, args.queues)],
    )
    print(
        "API writes: StreamQueue patches (status, finalizer, annotations) + Deployment create/patch (scale)"
    )
    print(f"poll-rate x queues would be {args.queues} status writes/s without the meaningful-change rule")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
