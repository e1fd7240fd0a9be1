"""``make demo``: watch a StreamQueue scale out on a burst of messages and back in, on this machine.

Everything is real except the kubelet: a redis-server, the local control plane (etcd,
kube-apiserver, kube-controller-manager), the CRD generated from the models, the operator as a subprocess, and
one local worker process per worker Pod (``WorkerPodRunner``). Several users send bursts through
``streamqueue.Client``; the table shows backlog, desired and current replicas and the replies each
user received, until the queue is back at zero replicas. ``--short`` is the unattended run the tests
execute; it exits non-zero if the queue did not scale out and back in or a reply went missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from streamqueue import Client
from streamqueue_operator.models import GROUP, PLURAL, VERSION

from .controlplane import ControlPlane
from .eventually import eventually, eventually_async
from .operatorproc import OperatorProcess, install_crd
from .podrunner import WorkerPodRunner
from .redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "demo"
QUEUE = "chat"


@dataclass(frozen=True)
class DemoConfig:
    """How much load, and how patient the scaler is; ``--short`` shrinks both for an unattended run."""

    users: int
    bursts: int
    burst_size: int
    pause_between_bursts: float
    handler_delay_ms: int
    stabilization_seconds: int
    idle_cooldown_seconds: int
    deadline_seconds: float
    workdir: Path

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoConfig:
        short = args.short or os.environ.get("STREAMQUEUE_DEMO_SHORT") == "1"
        return cls(
            users=args.users,
            bursts=2 if short else args.bursts,
            burst_size=300 if short else args.burst_size,
            pause_between_bursts=2.0 if short else 8.0,
            handler_delay_ms=50,
            stabilization_seconds=4 if short else 15,
            idle_cooldown_seconds=4 if short else 15,
            deadline_seconds=150.0 if short else 600.0,
            workdir=args.workdir,
        )


@dataclass
class Observed:
    """What the live view shows and the final verdict is judged on."""

    started: float = field(default_factory=time.monotonic)
    backlog: int | None = None
    pending: int | None = None
    desired: int = 0
    current: int = 0
    ready: int = 0
    processes: int = 0
    max_replicas: int = 0
    scaled_out_at: float | None = None
    scaled_in_at: float | None = None
    sent: int = 0
    replies: Counter[str] = field(default_factory=Counter)
    wrong_user_replies: int = 0
    last_scale_reason: str = ""


def queue_manifest(redis_url: str, cfg: DemoConfig) -> dict[str, Any]:
    """The example StreamQueue, pointed at the demo's Redis and tuned so scaling is visible quickly."""
    manifest = yaml.safe_load((ROOT / "examples" / "streamqueue.yaml").read_text())
    spec = manifest["spec"]
    spec["redis"] = {"url": redis_url}  # the demo's redis-server has no password: no redis-auth Secret
    spec["worker"].update(
        handler="streamqueue_harness.demo_handler:handle",
        concurrency=4,
        env=[{"name": "STREAMQUEUE_DEMO_DELAY_MS", "value": str(cfg.handler_delay_ms)}],
        shutdownGraceSeconds=5,
    )
    spec["scaling"].update(
        minReplicas=0,
        maxReplicas=6,
        targetBacklogPerReplica=40,
        scaleDownStabilizationSeconds=cfg.stabilization_seconds,
        idleCooldownSeconds=cfg.idle_cooldown_seconds,
    )
    manifest["metadata"]["namespace"] = NAMESPACE
    return manifest


class KubeView:
    """Reads the queue's status and its Deployment for the live table."""

    def __init__(self, kubeconfig: Path) -> None:
        api = k8s_config.new_client_from_config(str(kubeconfig))
        self.custom = k8s.CustomObjectsApi(api)
        self.apps = k8s.AppsV1Api(api)

    def refresh(self, seen: Observed, runner: WorkerPodRunner) -> None:
        queue: dict[str, Any] = self.custom.get_namespaced_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, NAMESPACE, PLURAL, QUEUE
        )
        status = queue.get("status") or {}
        seen.backlog = status.get("backlog")
        seen.pending = status.get("pending")
        seen.last_scale_reason = status.get("lastScaleReason") or seen.last_scale_reason
        deployments = self.apps.list_namespaced_deployment(
            NAMESPACE, label_selector=f"{GROUP}/queue={QUEUE}"
        ).items
        if deployments:
            dep = deployments[0]
            seen.desired = dep.spec.replicas or 0
            seen.current = (dep.status and dep.status.replicas) or 0
            seen.ready = (dep.status and dep.status.ready_replicas) or 0
        seen.processes = len(runner.running())
        seen.max_replicas = max(seen.max_replicas, seen.desired)
        now = time.monotonic()
        if seen.desired > 1 and seen.scaled_out_at is None:
            seen.scaled_out_at = now
        if seen.scaled_out_at is not None and seen.desired == 0 and seen.scaled_in_at is None:
            seen.scaled_in_at = now


def render(seen: Observed, cfg: DemoConfig, phase: str) -> str:
    """The live table: queue state on top, replies per user below."""
    t = time.monotonic() - seen.started
    backlog = "?" if seen.backlog is None else str(seen.backlog)
    pending = "?" if seen.pending is None else str(seen.pending)
    lines = [
        f"streamqueue demo  t={t:5.1f}s  phase: {phase}",
        "",
        f"  backlog {backlog:>6}   pending {pending:>6}   replicas desired {seen.desired}  "
        f"current {seen.current}  ready {seen.ready}   worker processes {seen.processes}",
        f"  peak replicas {seen.max_replicas}   last scale: {seen.last_scale_reason or '-'}",
        "",
        f"  {'user':<10}{'replies':>8}",
    ]
    for i in range(cfg.users):
        user = f"user{i}"
        lines.append(f"  {user:<10}{seen.replies[user]:>8}")
    lines.append(f"  {'total':<10}{sum(seen.replies.values()):>8}  of {seen.sent} sent")
    return "\n".join(lines)


class Screen:
    """A refreshing table on a terminal; one compact line per second when output is not a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self._last_line = 0.0

    def show(self, seen: Observed, cfg: DemoConfig, phase: str) -> None:
        if self.tty:
            sys.stdout.write("\x1b[H\x1b[2J" + render(seen, cfg, phase) + "\n")
            sys.stdout.flush()
        elif phase == "done" or time.monotonic() - self._last_line >= 1.0:
            self._last_line = time.monotonic()
            t = time.monotonic() - seen.started
            print(
                f"[demo t={t:5.1f}s] {phase:<26} backlog={seen.backlog} desired={seen.desired} "
                f"current={seen.current} ready={seen.ready} processes={seen.processes} "
                f"replies={sum(seen.replies.values())}/{seen.sent}",
                flush=True,
            )


async def send_bursts(client: Client, cfg: DemoConfig, seen: Observed) -> None:
    """Each burst: ``burst_size`` requests spread over the users, all awaited concurrently."""

    async def one(user: str, n: int) -> None:
        reply = await client.request(user, f"hello #{n} from {user}", timeout=cfg.deadline_seconds)
        if reply.response == f"Echo: hello #{n} from {user}":
            seen.replies[user] += 1
        else:
            seen.wrong_user_replies += 1

    tasks: list[asyncio.Task[None]] = []
    for burst in range(cfg.bursts):
        for n in range(cfg.burst_size):
            user = f"user{n % cfg.users}"
            tasks.append(asyncio.create_task(one(user, burst * cfg.burst_size + n)))
            seen.sent += 1
        if burst < cfg.bursts - 1:
            await asyncio.sleep(cfg.pause_between_bursts)
    await asyncio.gather(*tasks)


async def run_load_and_watch(
    cfg: DemoConfig, redis_url: str, view: KubeView, runner: WorkerPodRunner
) -> Observed:
    seen = Observed()
    screen = Screen()
    async with Client(redis_url) as client:
        load = asyncio.create_task(send_bursts(client, cfg, seen))

        async def back_to_zero() -> bool:
            await asyncio.to_thread(view.refresh, seen, runner)
            screen.show(seen, cfg, _phase(load.done(), seen))
            return load.done() and seen.scaled_in_at is not None and seen.processes == 0

        with contextlib.suppress(TimeoutError):  # the verdict names what did not happen in time
            await eventually_async(back_to_zero, "scale-in to zero", cfg.deadline_seconds, 0.5, TimeoutError)
        if load.done():
            load.result()
        else:
            load.cancel()
    screen.show(seen, cfg, "done")
    return seen


def _phase(load_done: bool, seen: Observed) -> str:
    if not load_done:
        return "sending bursts"
    if seen.scaled_in_at is None:
        return "draining / scaling in"
    return "workers exiting (SIGTERM)"


def verdict(seen: Observed, cfg: DemoConfig) -> tuple[bool, str]:
    """Did the queue scale out and back to zero, with every user's replies delivered to that user?"""
    total = sum(seen.replies.values())
    problems = []
    if seen.max_replicas < 2:
        problems.append(f"never scaled out (peak {seen.max_replicas} replicas)")
    if seen.scaled_in_at is None:
        problems.append("did not scale back in to zero before the deadline")
    elif seen.processes:
        problems.append(f"{seen.processes} worker processes still running after the scale-in")
    if total != seen.sent or seen.wrong_user_replies:
        problems.append(f"{total}/{seen.sent} replies, {seen.wrong_user_replies} to the wrong request")
    out_after = (seen.scaled_out_at or seen.started) - seen.started
    in_after = (seen.scaled_in_at or seen.started) - seen.started
    summary = (
        f"sent {seen.sent} messages from {cfg.users} users; each user got exactly their own replies "
        f"({total} in all); peak {seen.max_replicas} replicas "
        f"(scaled out {out_after:.1f}s after the first burst), "
        f"back to 0 at t={in_after:.1f}s"
    )
    return (not problems, "; ".join(problems) if problems else summary)


def wait_for_queue(view: KubeView, timeout: float = 60.0) -> None:
    """Block until the operator has created the queue's Deployment."""

    def created() -> bool:
        selector = f"{GROUP}/queue={QUEUE}"
        return bool(view.apps.list_namespaced_deployment(NAMESPACE, label_selector=selector).items)

    eventually(created, "the operator to create the worker Deployment", timeout, 0.5, TimeoutError)


def run(cfg: DemoConfig) -> int:
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    step = lambda text: print(f"[demo] {text}", flush=True)  # noqa: E731
    with contextlib.ExitStack() as stack:
        step("starting redis-server")
        redis = stack.enter_context(RedisServer())
        step("starting the local control plane (etcd, kube-apiserver, kube-controller-manager)")
        plane = stack.enter_context(ControlPlane(cfg.workdir / "cluster"))
        step("installing the StreamQueue CRD and the demo namespace")
        install_crd(plane)
        plane.kubectl("create", "namespace", NAMESPACE)
        step(f"starting the operator (log: {cfg.workdir / 'operator-1.log'})")
        stack.enter_context(OperatorProcess(plane.kubeconfig, f"--namespace={NAMESPACE}", cfg.workdir))
        step("starting the worker-pod runner (one local worker process per worker Pod)")
        runner = stack.enter_context(WorkerPodRunner(plane.kubeconfig, NAMESPACE, f"{GROUP}/queue={QUEUE}"))
        step("applying examples/streamqueue.yaml (minReplicas 0, maxReplicas 6)")
        plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(queue_manifest(redis.url, cfg)))
        view = KubeView(plane.kubeconfig)
        wait_for_queue(view)
        seen = asyncio.run(run_load_and_watch(cfg, redis.url, view, runner))
        ok, text = verdict(seen, cfg)
        step(("PASSED: " if ok else "FAILED: ") + text)
        step("stopping everything")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m streamqueue_harness.demo",
        description="Local demo: a StreamQueue scaling out on bursts of messages and back in to zero.",
    )
    parser.add_argument(
        "--short", action="store_true", help="short unattended run (also STREAMQUEUE_DEMO_SHORT=1)"
    )
    parser.add_argument("--users", type=int, default=5, help="number of users sending (default 5)")
    parser.add_argument("--bursts", type=int, default=3, help="number of bursts (default 3)")
    parser.add_argument("--burst-size", type=int, default=600, help="messages per burst (default 600)")
    parser.add_argument(
        "--workdir", type=Path, default=ROOT / ".demo", help="state and logs (default .demo/)"
    )
    try:
        return run(DemoConfig.from_args(parser.parse_args(argv)))
    except KeyboardInterrupt:
        print("\n[demo] interrupted; everything stopped", flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
