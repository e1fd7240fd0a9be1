"""``kubectl sq report``: everything a bug report about one queue needs, in one JSON document, with
secrets redacted (values of variables named like a secret, passwords in URLs) and message bodies left
out (they are the users' data)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..connection import redact_url
from .kube import QUEUE_LABEL, Kubectl, KubectlError, Queue, events, operator_leader

REDACTED = "<redacted>"
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_?KEY|CREDENTIAL", re.IGNORECASE)
_URL_WITH_PASSWORD = re.compile(r"\w+://[^\s/@]*:[^\s/@]*@\S*")
_DROP = {"managedFields", "kubectl.kubernetes.io/last-applied-configuration"}
DEAD_LETTERS_SHOWN = 20


def redact(value: Any) -> Any:
    """A copy with secret-looking variable values and URL passwords replaced, noisy metadata dropped."""
    if isinstance(value, dict):
        out = {k: redact(v) for k, v in value.items() if k not in _DROP}
        if isinstance(out.get("name"), str) and "value" in out and _SECRET_NAME.search(out["name"]):
            out["value"] = REDACTED
        return out
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _URL_WITH_PASSWORD.sub(lambda m: redact_url(m[0]), value)
    return value


def collect(
    kubectl: Kubectl, queue: Queue, redis_side: Callable[[list[str]], dict[str, Any]], lease: str | None
) -> dict[str, Any]:
    report = {
        "versions": _versions(kubectl),
        "streamqueue": queue.obj,
        "deployment": queue.deployment,
        "pods": _section(lambda: _pods(kubectl, queue.name)),
        "events": _section(lambda: events(kubectl, queue.name, limit=50)),
        "operator_leader": operator_leader(kubectl, lease),
        "redis": _section(lambda: redis_side(["status"])),
        "oldest_dead_letters": _section(lambda: _oldest_dead_letters(redis_side)),
    }
    return redact(report)


def _section(read: Callable[[], Any]) -> Any:
    """One part of the report; a part that cannot be read says why instead of failing the report."""
    try:
        return read()
    except (KubectlError, RuntimeError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}


def _versions(kubectl: Kubectl) -> dict[str, Any]:
    try:
        plugin = version("streamqueue")
    except PackageNotFoundError:
        plugin = "unknown"
    return {
        "kubectl_sq": plugin,
        "kubectl": _section(lambda: kubectl.run("version", "-o", "json", namespaced=False)),
    }


def _pods(kubectl: Kubectl, name: str) -> list[dict[str, Any]]:
    pods = kubectl.get("pods", "-l", f"{QUEUE_LABEL}={name}")["items"]
    return [
        {
            "name": p["metadata"]["name"],
            "phase": p["status"].get("phase"),
            "node": p["spec"].get("nodeName"),
            "started": p["status"].get("startTime"),
            "containers": [
                {
                    "name": c["name"],
                    "ready": c.get("ready"),
                    "restarts": c.get("restartCount"),
                    "state": c.get("state"),
                    "last_state": c.get("lastState"),
                }
                for c in p["status"].get("containerStatuses") or []
            ],
        }
        for p in pods
    ]


def _oldest_dead_letters(redis_side: Callable[[list[str]], dict[str, Any]]) -> list[dict[str, Any]]:
    """The first dead letters (the dead-letter count is in ``redis``), without their fields."""
    letters = redis_side(["dlq", "list", "--limit", str(DEAD_LETTERS_SHOWN)])["dead_letters"]
    return [{k: v for k, v in letter.items() if k != "fields"} for letter in letters]
