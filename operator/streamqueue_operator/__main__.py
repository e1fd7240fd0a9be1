"""``streamqueue-operator``: run the StreamQueue operator (kopf) with metrics and a liveness endpoint."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import kopf

from . import __version__, metrics
from . import handlers as _handlers  # noqa: F401  (importing registers the kopf handlers)
from .handlers import OperatorConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = OperatorConfig.from_env()
    parser = argparse.ArgumentParser(
        prog="streamqueue-operator",
        description="Scale Redis Streams worker Deployments on consumer-group backlog (StreamQueue CRD).",
    )
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument("--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port; 0 disables")
    parser.add_argument("--metrics-address", default="0.0.0.0", help="address the metrics server binds to")
    parser.add_argument("--liveness-port", type=int, default=8081, help="kopf /healthz port; 0 disables")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--worker-image",
        default=defaults.worker_image,
        help="image for StreamQueues that set no worker.image (env STREAMQUEUE_OPERATOR_WORKER_IMAGE)",
    )
    parser.add_argument(
        "--status-min-interval",
        type=float,
        default=defaults.status_min_interval,
        help="seconds between status writes that only refresh backlog/pending/lag counters",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    level = getattr(logging, args.log_level.upper())
    kopf.configure(verbose=level <= logging.DEBUG, log_prefix=True)
    logging.getLogger().setLevel(level)
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    config = OperatorConfig(worker_image=args.worker_image, status_min_interval=args.status_min_interval)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    kopf.run(
        clusterwide=args.all_namespaces,
        namespaces=args.namespace,
        standalone=True,
        liveness_endpoint=liveness,
        memo=kopf.Memo(config=config),
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
