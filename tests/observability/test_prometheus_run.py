"""A real Prometheus scrapes the operator and the workers of a demo-like run; the alerts fire.

Everything is real except the kubelet (the harness's pod runner starts one worker process per Pod):
redis-server, kube-apiserver and kube-controller-manager, the operator as a subprocess serving
/metrics, the workers serving /metrics on their health port, and Debian's prometheus scraping both
every second (workers found through a file_sd file the test keeps up to date). The dashboard's
panels must all show data; the backlog alert (and its neighbours) must fire on a held backlog, with
their `for:` and windows shortened through the chart's own values.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from streamqueue import Client
from streamqueue_harness.eventually import eventually
from streamqueue_harness.operatorproc import OperatorProcess
from streamqueue_harness.podrunner import WorkerPodRunner
from streamqueue_harness.ports import free_port
from streamqueue_harness.prometheus import (
    RULES_FILE,
    Prometheus,
    PrometheusError,
    ScrapeJob,
    WorkerTargets,
    dashboard,
    panel_queries,
    substitute,
)
from streamqueue_harness.redis_server import RedisServer
from streamqueue_operator import models

from tests.observability.test_rules_and_dashboard import helm_overrides, rendered_groups

ROOT = Path(__file__).resolve().parents[2]
STREAM, GROUP = "user_messages_queue", "ai_service_group"
OPERATOR_JOB, WORKER_JOB = "streamqueue-operator", "streamqueue-worker"

pytestmark = [pytest.mark.slow]


@contextlib.contextmanager
def operator(control_plane: Any, namespace: str, log_dir: Path) -> Iterator[int]:
    """The operator watching ``namespace``, its /metrics on a free loopback port (yielded)."""
    port = free_port()
    metrics = [f"--metrics-port={port}", "--metrics-address=127.0.0.1", "--status-min-interval=1"]
    with OperatorProcess(control_plane.kubeconfig, f"--namespace={namespace}", log_dir, *metrics):
        yield port


def queue(name: str, namespace: str, redis_url: str, **scaling: Any) -> dict[str, Any]:
    """examples/streamqueue.yaml pointed at ``redis_url``, with the demo's slow echo handler."""
    manifest = yaml.safe_load((ROOT / "examples" / "streamqueue.yaml").read_text())
    manifest["metadata"] = {"name": name, "namespace": namespace}
    spec = manifest["spec"]
    spec["redis"] = {"url": redis_url}  # the test's redis-server has no password: no redis-auth Secret
    spec["worker"].update(
        handler="streamqueue_harness.demo_handler:handle",
        concurrency=4,
        env=[{"name": "STREAMQUEUE_DEMO_DELAY_MS", "value": "50"}],
        shutdownGraceSeconds=5,
    )
    spec["scaling"].update(scaling)
    return manifest


async def burst(redis_url: str, count: int, users: int = 4) -> int:
    """``count`` requests from ``users`` users, all awaited; returns the replies that came back right."""
    async with Client(redis_url) as client:

        async def one(n: int) -> bool:
            reply = await client.request(f"user{n % users}", f"hello #{n}", timeout=90)
            return bool(reply.response == f"Echo: hello #{n}")

        return sum(await asyncio.gather(*(one(n) for n in range(count))))


def test_every_dashboard_panel_has_data_from_a_demo_like_run(
    control_plane: Any, kube_namespace: str, redis_server: RedisServer, streamqueue_crd: Any, tmp_path: Path
) -> None:
    ns, name = kube_namespace, "chat"
    selector = f"{models.GROUP}/queue={name}"
    file_sd = tmp_path / "workers.json"
    with contextlib.ExitStack() as stack:
        metrics_port = stack.enter_context(operator(control_plane, ns, tmp_path))
        runner = stack.enter_context(
            WorkerPodRunner(control_plane.kubeconfig, ns, selector, log_dir=tmp_path / "pods")
        )
        targets = stack.enter_context(WorkerTargets(file_sd, runner.running, ns))
        jobs = [
            ScrapeJob(OPERATOR_JOB, targets=[f"127.0.0.1:{metrics_port}"]),
            ScrapeJob(WORKER_JOB, file_sd=file_sd, honor_labels=False),
        ]
        prom = stack.enter_context(Prometheus(jobs, [RULES_FILE], workdir=tmp_path / "prometheus"))
        prom.wait_for_targets(OPERATOR_JOB)

        scaling = {"minReplicas": 1, "maxReplicas": 4, "targetBacklogPerReplica": 40,
                   "scaleDownStabilizationSeconds": 5, "idleCooldownSeconds": 5}  # fmt: skip
        manifest = queue(name, ns, redis_server.url, **scaling)
        manifest["spec"]["housekeeping"] = {"trimStream": True, "intervalSeconds": 5}  # trimmed entries panel
        control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
        prom.wait_for_targets(WORKER_JOB, timeout=60)

        # An invalid entry (no message field) for the dead-letter panel, then a burst that scales out.
        redis_server.client().xadd(STREAM, {"user_id": "user0", "timestamp": "0"})
        assert asyncio.run(burst(redis_server.url, 400)) == 400
        assert len(targets.seen) >= 2, "the burst did not scale the workers out"

        variables = {"namespace": ns, "queue": name}
        empty: dict[str, str] = {}

        def panels_without_data() -> dict[str, str]:
            empty.clear()
            for title, ref, expr in panel_queries(dashboard()):
                query = substitute(expr, variables)
                if not prom.query(query):
                    empty[f"{title} [{ref}]"] = query
            return empty

        try:
            eventually(lambda: not panels_without_data(), "every panel query to return a series", 45, 0.5)
        except AssertionError:
            raise AssertionError(f"panels without data: {empty}") from None
        # The data is the run's, not a placeholder: the series show what happened.
        backlog = prom.query(f'max_over_time(streamqueue_backlog{{namespace="{ns}", name="{name}"}}[5m])')
        assert float(backlog[0]["value"][1]) > 40
        peak = prom.query(f'max_over_time(streamqueue_desired_replicas{{namespace="{ns}"}}[5m])')
        assert float(peak[0]["value"][1]) >= 2
        processed = prom.query(f'sum(streamqueue_messages_processed_total{{namespace="{ns}"}})')
        assert float(processed[0]["value"][1]) > 0
        dead = prom.query(f'sum(streamqueue_messages_dead_lettered_total{{namespace="{ns}"}})')
        assert float(dead[0]["value"][1]) == 1


def test_backlog_redis_and_max_replicas_alerts_fire(
    control_plane: Any, kube_namespace: str, redis_server: RedisServer, streamqueue_crd: Any, tmp_path: Path
) -> None:
    """No pod runner: the one replica allowed never consumes, so the backlog grows as entries arrive.

    A second queue points at a port where no Redis listens. The rules are the chart's, rendered with
    shortened `for:` and windows, so they fire within seconds.
    """
    ns = kube_namespace
    overrides = {
        "StreamQueueBacklogGrowing": {"for": "5s", "window": "30s", "threshold": 5},
        "StreamQueueReplicasAtMax": {"for": "5s", "window": "15s", "threshold": 5},
        "StreamQueueRedisUnreachable": {"for": "5s", "window": "10s"},
    }
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rendered_groups(*helm_overrides(overrides))}))
    r = redis_server.client()
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    with contextlib.ExitStack() as stack:
        metrics_port = stack.enter_context(operator(control_plane, ns, tmp_path))
        jobs = [ScrapeJob(OPERATOR_JOB, targets=[f"127.0.0.1:{metrics_port}"])]
        prom = stack.enter_context(Prometheus(jobs, [rules], workdir=tmp_path / "prometheus"))
        prom.wait_for_targets(OPERATOR_JOB)
        held = queue("held", ns, redis_server.url, minReplicas=0, maxReplicas=1, targetBacklogPerReplica=5)
        lost = queue("lost", ns, f"redis://127.0.0.1:{free_port()}/0", minReplicas=0, maxReplicas=1)
        control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([held, lost]))

        expected = {
            ("StreamQueueBacklogGrowing", "held"),
            ("StreamQueueReplicasAtMax", "held"),
            ("StreamQueueRedisUnreachable", "lost"),
        }

        def firing() -> set[tuple[str, str]]:
            r.xadd(STREAM, {"user_id": "alice", "message": "hello", "timestamp": "0"})  # steady arrivals
            alerts = prom.alerts()
            return {
                (a["labels"]["alertname"], a["labels"]["name"])
                for a in alerts
                if a["state"] == "firing" and a["labels"].get("namespace") == ns
            }

        try:
            seen = prom.wait_for(lambda: (now := firing()) >= expected and now, 120, "the alerts to fire")
        except PrometheusError as exc:
            raise AssertionError(f"{exc}\nalerts: {prom.alerts()}") from None
        assert ("StreamQueueBacklogGrowing", "lost") not in seen
        (alert,) = [
            a for a in prom.alerts()
            if a["labels"]["alertname"] == "StreamQueueBacklogGrowing" and a["state"] == "firing"
        ]  # fmt: skip
        assert alert["labels"]["severity"] == "warning"
        assert alert["annotations"]["summary"] == f"Backlog of {ns}/held keeps growing"
