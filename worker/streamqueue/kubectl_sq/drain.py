"""``kubectl sq drain``: stop a queue's workers without leaving work behind.

The pause annotations do it in two steps, so the operator's own policy never races the drain: first
hold the workers at their current count (at least one, so a queue scaled to zero with messages still
waiting gets a worker), which keeps them serving while nothing scales them in; once the backlog
(undelivered plus pending) reads zero, hold at zero. The queue stays paused at zero until
``kubectl sq resume``; messages sent meanwhile wait in Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .kube import PAUSED, PAUSED_REPLICAS, Kubectl, Queue, annotate


def drain(
    kubectl: Kubectl, queue: Queue, read_status: Callable[[], dict[str, Any]], timeout: float, interval: float
) -> str:
    current = int(((queue.deployment or {}).get("spec") or {}).get("replicas") or 0)
    hold = max(current, 1)
    annotate(kubectl, queue.name, f"{PAUSED}=true", f"{PAUSED_REPLICAS}={hold}")
    deadline = time.monotonic() + timeout
    while (backlog := read_status()["backlog"]) > 0:
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"backlog still {backlog} after {timeout:.0f}s; {queue.name} is held at {hold} replica(s) "
                f"(run drain again to keep waiting, or resume)"
            )
        time.sleep(interval)  # polling Redis, as kubectl wait polls the API: there is no event to wait on
    annotate(kubectl, queue.name, f"{PAUSED}=true", f"{PAUSED_REPLICAS}=0")
    return (
        f"streamqueue {queue.name} drained: backlog 0, paused at 0 replicas "
        f"(kubectl sq resume {queue.name} to undo)"
    )
