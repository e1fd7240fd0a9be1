"""The operator's own settings, declared once: flags, environment variables and the docs table.

Each field carries its help text (and, where it is not the derived one, its flag or environment
variable) in its metadata; ``parser`` builds the argparse flags from them, ``from_env`` reads the
environment, and ``docs_table`` renders the table in docs/operator.md (kept current by
``hack/reference.py``). A flag wins over its environment variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .deployment import DEFAULT_WORKER_IMAGE

ENV_PREFIX = "STREAMQUEUE_OPERATOR_"
LOG_LEVELS = ("debug", "info", "warning", "error")


def _setting(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class OperatorSettings:
    """Everything ``streamqueue-operator`` is configured with (the StreamQueues configure the rest)."""

    namespace: tuple[str, ...] = _setting(
        (),
        "watch this namespace (repeatable; env: comma-separated)",
        metavar="NS",
        shown="one scope is required",
    )
    all_namespaces: bool = _setting(False, "watch every namespace (instead of --namespace)")
    metrics_port: int = _setting(9090, "Prometheus `/metrics` port; `0` disables")
    metrics_address: str = _setting("0.0.0.0", "address the metrics server binds to")
    liveness_port: int = _setting(8081, "kopf's liveness endpoint `/healthz` port; `0` disables")
    log_level: str = _setting("info", "log level", choices=LOG_LEVELS)
    worker_image: str = _setting(
        DEFAULT_WORKER_IMAGE,
        "image of StreamQueues without `worker.image`",
        shown="`streamqueue/worker:<version>`",
    )
    status_min_interval: float = _setting(10.0, "seconds between status writes that only refresh counters")
    rollout_stagger_seconds: float = _setting(
        30.0,
        "seconds between two queues' worker rollouts that the operator causes itself (a new default "
        "worker image or Deployment rendering after an upgrade), not a spec change; `0`: all at once",
    )
    leader_election: bool = _setting(
        True, "elect one active replica through a Lease; off: this process always acts (one replica only)"
    )
    lease_name: str = _setting(
        "streamqueue-operator", "name of the Lease (the chart: the release's full name)"
    )
    pod_namespace: str = _setting(
        "",
        "namespace of the Lease and its Events: the operator's own (downward API); "
        "unset: the first `--namespace`, else `default`",
        env="POD_NAMESPACE",
    )
    pod_name: str = _setting(
        "", "this replica's Pod (downward API); its identity in the Lease is `<pod>_<random>`", env="POD_NAME"
    )
    lease_duration: float = _setting(
        15.0, "seconds a standby waits after the last observed renewal before it takes the Lease"
    )
    renew_deadline: float = _setting(
        10.0, "seconds after its last successful renewal at which a leader stops writing (< lease duration)"
    )
    retry_period: float = _setting(2.0, "seconds between attempts to acquire or renew the Lease")
    rest_max_seconds: float = _setting(
        30.0,
        "seconds at most between full polls of a queue at rest (no backlog, replicas at minReplicas); "
        "meanwhile the rest sweep (`--rest-check-seconds`) still wakes it at its first message",
    )
    rest_check_seconds: float = _setting(
        0.25,
        "seconds between two checks of the queues at rest: one script call per 500 such queues on a "
        "Redis (XINFO GROUPS of each partition); a queue's first message wakes it within this time",
    )

    def __post_init__(self) -> None:
        if not self.retry_period * 1.2 < self.renew_deadline < self.lease_duration:
            raise ValueError("the Lease timings need retry-period * 1.2 < renew-deadline < lease-duration")

    @property
    def lease_namespace(self) -> str:
        return self.pod_namespace or (self.namespace[0] if self.namespace else "default")

    def identity(self) -> str:
        """Unique per process (as client-go does), so a restarted container never inherits a Lease."""
        return f"{self.pod_name or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


FIELDS = dataclasses.fields(OperatorSettings)


def flag(f: dataclasses.Field[Any]) -> str:
    return "--" + f.name.replace("_", "-")


def env_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("env") or ENV_PREFIX + f.name.upper())


def _convert(f: dataclasses.Field[Any], text: str) -> Any:
    kind: Any = type(f.default)
    if kind is bool:
        return text.strip().lower() in ("1", "true", "yes", "on")
    if kind is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return kind(text)


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings the environment sets (non-empty variables only), converted to the field types."""
    return {f.name: _convert(f, environ[env_name(f)]) for f in FIELDS if environ.get(env_name(f))}


def parser() -> argparse.ArgumentParser:
    """The command line, one flag per field; the defaults shown are resolved later (env, then field)."""
    out = argparse.ArgumentParser(
        prog="streamqueue-operator",
        description="Scale Redis Streams worker Deployments on consumer-group backlog (StreamQueue CRD).",
        argument_default=argparse.SUPPRESS,
    )
    for f in FIELDS:
        kind = type(f.default)
        extra: dict[str, Any]
        if kind is bool:
            extra = {"action": argparse.BooleanOptionalAction}
        elif kind is tuple:
            extra = {"action": "append", "metavar": f.metadata["metavar"]}
        else:
            extra = {"type": kind, **({"choices": f.metadata["choices"]} if "choices" in f.metadata else {})}
        out.add_argument(flag(f), help=f"{f.metadata['help']} (env {env_name(f)})", **extra)
    out.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return out


def parse(argv: Sequence[str] | None, environ: Mapping[str, str] = os.environ) -> OperatorSettings:
    """Flags over environment over defaults; a usage error (exit 2) names what is wrong."""
    cli = parser()
    given = vars(cli.parse_args(argv))
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    try:
        settings = OperatorSettings(**{**from_env(environ), **given})
    except ValueError as exc:
        cli.error(str(exc))
    if bool(settings.namespace) == settings.all_namespaces:
        cli.error("exactly one of --namespace (repeatable) or --all-namespaces is required")
    return settings


def _shown(f: dataclasses.Field[Any]) -> str:
    if "shown" in f.metadata:
        return str(f.metadata["shown"])
    value = f.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`" if value != "" else "—"


def docs_table() -> list[str]:
    """The Markdown table of every setting, for docs/operator.md."""
    lines = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in FIELDS:
        name = f"`{flag(f)}`" if type(f.default) is not bool else f"`{flag(f)}` / `--no-{flag(f)[2:]}`"
        lines.append(f"| {name} | `{env_name(f)}` | {_shown(f)} | {f.metadata['help']} |")
    return lines
