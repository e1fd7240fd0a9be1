"""The operator's API client: a scale patch never waits behind the shared pool's other requests."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

from kubernetes import client as k8s
from streamqueue_operator.kubeapi import Cluster


async def test_a_scale_patch_does_not_wait_behind_the_shared_api_pool() -> None:
    """At 2,000 queues the shared pool's threads are taken by status writes on the same ticks; a
    queue woken by its first message must still scale at once."""
    loop = asyncio.get_running_loop()
    shared = ThreadPoolExecutor(1)
    loop.set_default_executor(shared)
    release = threading.Event()
    status_write = loop.run_in_executor(None, release.wait)  # the pool's only thread, busy
    cluster = Cluster(k8s.ApiClient(k8s.Configuration(host="http://127.0.0.1:9")))
    patched: list[tuple[Any, ...]] = []
    cluster.apps = SimpleNamespace(  # type: ignore[assignment]
        patch_namespaced_deployment=lambda *args, **kwargs: patched.append(args)
    )
    try:
        await asyncio.wait_for(cluster.scale("ns", "q-worker", 1), timeout=10)
        assert patched == [("q-worker", "ns", {"spec": {"replicas": 1}})]
    finally:
        release.set()
        await status_write
        shared.shutdown()
