"""``streamqueue-operator``: run the StreamQueue operator (kopf) with metrics and a liveness endpoint."""

from __future__ import annotations

import logging
import os
import sys

import kopf

from . import handlers as _handlers  # noqa: F401  (importing registers the kopf handlers)
from . import metrics, settings


def main(argv: list[str] | None = None) -> int:
    config = settings.parse(argv)
    level = getattr(logging, config.log_level.upper())
    kopf.configure(verbose=level <= logging.DEBUG, log_prefix=True)
    logging.getLogger().setLevel(level)
    if config.metrics_port:
        metrics.serve(config.metrics_port, config.metrics_address)
    liveness = f"http://0.0.0.0:{config.liveness_port}/healthz" if config.liveness_port else None
    kopf.run(
        clusterwide=config.all_namespaces,
        namespaces=list(config.namespace),
        standalone=True,
        liveness_endpoint=liveness,
        memo=kopf.Memo(config=config),
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
