"""/healthz, /readyz and /metrics of a running Worker, served by a real aiohttp server."""

from __future__ import annotations

import aiohttp
from streamqueue.health import start_health_server
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.ports import free_port

from tests.worker.conftest import group_settled, send


async def test_probes_follow_the_worker_and_metrics_count_its_work(raw, settings, workers) -> None:
    worker = await workers.start(settings(max_message_bytes=10))
    port = free_port()
    runner = await start_health_server(lambda: worker.ready, worker.metrics.registry, "127.0.0.1", port)
    base = f"http://127.0.0.1:{port}"
    try:
        for i in range(3):
            send(raw, "kate", f"m{i}")
        send(raw, "kate", "much too long for the limit")
        await eventually_async(lambda: group_settled(raw), "all handled", timeout=15)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 200
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
            assert "streamqueue_messages_processed_total 3.0" in text
            assert 'streamqueue_messages_dead_lettered_total{reason="message_too_large"} 1.0' in text
            assert "streamqueue_handler_duration_seconds_count 3.0" in text
            assert "streamqueue_messages_in_flight 0.0" in text
            await workers.stop(worker)
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 503
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200
    finally:
        await runner.cleanup()
