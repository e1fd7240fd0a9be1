"""``kubectl sq``'s command line: parse, run one command, print a table (or ``-o json``)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from ..sqtool.args import add_dlq_commands, dlq_argv
from . import render
from .drain import drain
from .kube import (
    PAUSED,
    PAUSED_REPLICAS,
    Kubectl,
    KubectlError,
    Queue,
    annotate,
    events,
    load_queue,
    operator_leader,
)
from .reach import SqtoolError, direct, in_pod, tool_secret
from .report import collect

DESCRIPTION = """Day-two commands for streamqueue queues (StreamQueue objects).

Redis is reached from a short-lived pod run from the queue's worker image with the worker
Deployment's environment (so it works where Redis is reachable only inside the cluster); --direct
runs the Redis side here instead (add --redis-url when the queue's own URL is not reachable from
here, e.g. through kubectl port-forward). With a least-privilege Redis ACL, the tool's own Redis
user comes from a Secret: --redis-secret, or the StreamQueue's streamqueue.io/tool-redis-secret
annotation."""


def _common() -> argparse.ArgumentParser:
    """Options accepted before or after the command (default SUPPRESS, so a later one never resets)."""
    common = argparse.ArgumentParser(add_help=False)
    add = common.add_argument
    add(
        "-n",
        "--namespace",
        default=argparse.SUPPRESS,
        help="the StreamQueue's namespace (default: the context's)",
    )
    add("--context", default=argparse.SUPPRESS, help="kubeconfig context")
    add("--kubeconfig", default=argparse.SUPPRESS, help="kubeconfig file")
    add(
        "-o", "--output", choices=("table", "json"), default=argparse.SUPPRESS, help="table (default) or json"
    )
    add(
        "--direct",
        action="store_true",
        default=argparse.SUPPRESS,
        help="reach Redis from this machine, not from a pod",
    )
    add("--redis-url", default=argparse.SUPPRESS, help="--direct: this Redis URL instead of the queue's")
    add(
        "--redis-secret",
        metavar="SECRET",
        default=argparse.SUPPRESS,
        help="the tool's own Redis user: a Secret in the queue's namespace with username and password keys "
        "(default: the StreamQueue's streamqueue.io/tool-redis-secret annotation, else the worker's user)",
    )
    add(
        "--pod-timeout",
        type=float,
        default=argparse.SUPPRESS,
        help="seconds the Redis pod may take (default 120)",
    )
    return common


def parser() -> argparse.ArgumentParser:
    common = _common()
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("name", metavar="NAME", help="the StreamQueue")
    top = argparse.ArgumentParser(
        prog="kubectl sq",
        description=DESCRIPTION,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common, *parents], help=summary, description=summary)

    status = command(
        "status",
        "Backlog per partition, consumers, leases, limit bound, dead letters, Events, leader.",
        named,
    )
    status.add_argument(
        "--operator-lease",
        metavar="NAMESPACE/NAME",
        help="the operator's Lease (default: any named streamqueue*)",
    )
    pause = command("pause", "Hold the worker count (pause annotations); --replicas N holds it at N.", named)
    pause.add_argument("--replicas", type=int, help="hold at this many workers (0 stops them)")
    command("resume", "Remove the pause annotations: the operator scales again from its next poll.", named)
    drain = command(
        "drain",
        "Hold the workers (at least one) until the backlog is empty, then pause at 0 replicas.",
        named,
    )
    drain.add_argument(
        "--timeout", type=float, default=600, help="seconds to wait for the backlog (default 600)"
    )
    drain.add_argument("--interval", type=float, default=2, help="seconds between backlog reads (default 2)")
    add_dlq_commands(
        commands.add_parser(
            "dlq", help="Dead letters: list, show, redrive, purge.", description="Dead letters."
        ),
        common,
        named,
    )
    report = command("report", "Everything a bug report needs, as JSON, secrets redacted.", named)
    report.add_argument("--operator-lease", metavar="NAMESPACE/NAME", help="the operator's Lease")
    report.add_argument("-f", "--file", help="write the report here instead of stdout")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    options: dict[str, Any] = {
        "output": "table", "direct": False, "redis_url": None, "redis_secret": None, "pod_timeout": 120.0,
    }  # fmt: skip
    options |= vars(args)
    args = argparse.Namespace(**options)
    kubectl = Kubectl(
        getattr(args, "namespace", None), getattr(args, "context", None), getattr(args, "kubeconfig", None)
    )
    try:
        queue = load_queue(kubectl, args.name)
        print(_run(kubectl, queue, args))
    except (KubectlError, SqtoolError, subprocess.TimeoutExpired, TimeoutError) as exc:
        print(f"kubectl sq {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _run(kubectl: Kubectl, queue: Queue, args: argparse.Namespace) -> str:
    secret = tool_secret(queue, args.redis_secret)
    if args.direct:
        side = direct(kubectl, args.redis_url, secret)
    else:
        side = in_pod(kubectl, args.pod_timeout, secret)

    def redis_side(argv: list[str]) -> dict[str, Any]:
        return side(queue, argv)

    as_json = args.output == "json"
    if args.command == "status":
        data = status_data(kubectl, queue, redis_side(["status"]), args.operator_lease)
        return json.dumps(data, indent=2) if as_json else render.status(data)
    if args.command == "dlq":
        data = redis_side(dlq_argv(args))
        if args.dlq_command == "show":
            return json.dumps(data, indent=2) if as_json else render.dead_letter(data["dead_letter"])
        return json.dumps(data, indent=2) if as_json else render.dlq_result(args.dlq_command, data)
    if args.command == "report":
        text = json.dumps(collect(kubectl, queue, redis_side, args.operator_lease), indent=2)
        if args.file:
            with open(args.file, "w", encoding="utf-8") as out:
                out.write(text + "\n")
            return f"report written to {args.file}"
        return text
    done = _scale(kubectl, queue, args, redis_side)
    return json.dumps({"queue": queue.name, "message": done}) if as_json else done


def _scale(kubectl: Kubectl, queue: Queue, args: argparse.Namespace, redis_side: Any) -> str:
    if args.command == "pause":
        if args.replicas is None:
            annotate(kubectl, queue.name, f"{PAUSED}=true", f"{PAUSED_REPLICAS}-")
            return f"streamqueue {queue.name} paused: the operator holds its current worker count"
        annotate(kubectl, queue.name, f"{PAUSED}=true", f"{PAUSED_REPLICAS}={args.replicas}")
        return f"streamqueue {queue.name} paused at {args.replicas} replica(s)"
    if args.command == "resume":
        annotate(kubectl, queue.name, f"{PAUSED}-", f"{PAUSED_REPLICAS}-")
        return f"streamqueue {queue.name} resumed: the operator scales it again"
    return drain(kubectl, queue, lambda: redis_side(["status"]), args.timeout, args.interval)


def status_data(kubectl: Kubectl, queue: Queue, redis: dict[str, Any], lease: str | None) -> dict[str, Any]:
    """What ``status`` shows: the queue's Kubernetes side, its Redis side, Events and the leader."""
    state = queue.obj.get("status") or {}
    deployment = (queue.deployment or {}).get("status") or {}
    pause = {k: v for k, v in queue.annotations.items() if k in (PAUSED, PAUSED_REPLICAS)}
    return {
        "queue": {
            "name": queue.name,
            "namespace": queue.namespace,
            "replicas": deployment.get("readyReplicas", 0),
            "desired": state.get("desiredReplicas"),
            "paused": ", ".join(f"{k}={v}" for k, v in pause.items()) or None,
            "conditions": state.get("conditions", []),
        },
        "redis": redis,
        "events": events(kubectl, queue.name),
        "leader": operator_leader(kubectl, lease),
    }
