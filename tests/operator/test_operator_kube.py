"""The operator end to end on the local control plane and a real redis-server.

Short stabilization and cooldown values keep each test to seconds; every wait is bounded.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from streamqueue_harness.eventually import eventually
from streamqueue_harness.partition import PartitionProxy
from streamqueue_harness.podrunner import WorkerPodRunner
from streamqueue_harness.ports import free_port
from streamqueue_harness.redis_server import RedisServer
from streamqueue_operator.deployment import DEFAULT_WORKER_IMAGE
from streamqueue_operator.models import GROUP, VERSION

from tests.chart.helm import CHART, KUBE_VERSION, helm
from tests.operator.queues import CGROUP, STREAM, Queues, metric, push, steady

pytestmark = pytest.mark.kube


def test_invalid_streamqueues_are_rejected_with_what_to_fix(
    control_plane: Any, kube_namespace: str, streamqueue_crd: dict[str, Any]
) -> None:
    cases = {
        "password-in-url": ({"redis": {"url": "redis://:hunter2@redis:6379/0"}},
                            "must not contain a password"),
        "min-above-max": ({"scaling": {"minReplicas": 5, "maxReplicas": 2}},
                          "must not exceed scaling.maxReplicas"),
        "fallback-outside": ({"scaling": {"maxReplicas": 3, "fallbackReplicas": 4}},
                             "fallbackReplicas must lie within [minReplicas, maxReplicas]"),
        "grace": ({"worker": {"shutdownGraceSeconds": 60, "terminationGracePeriodSeconds": 30}},
                  "terminationGracePeriodSeconds must be greater than worker.shutdownGraceSeconds"),
        "literal-password": ({"worker": {"env": [{"name": "STREAMQUEUE_REDIS_PASSWORD", "value": "x"}]}},
                             "use redis.passwordSecretRef"),
        "ca-without-tls": ({"redis": {"tls": {"caSecretRef": {"name": "ca"}}}}, "caSecretRef needs TLS"),
        "negative-min": ({"scaling": {"minReplicas": -1}}, "spec.scaling.minReplicas"),
        "bad-scheme": ({"redis": {"url": "http://redis:6379"}}, "spec.redis.url"),
        "bad-enum": ({"worker": {"logLevel": "LOUD"}}, "supported values"),
        "budget-zero": ({"disruption": {"maxUnavailable": 0}}, "0 would block every node drain"),
        "budget-no-percent": ({"disruption": {"maxUnavailable": "1"}}, "a percentage from 1% to 100%"),
    }  # fmt: skip
    for name, (spec, message) in cases.items():
        manifest = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "StreamQueue",
                    "metadata": {"name": name, "namespace": kube_namespace}, "spec": spec}  # fmt: skip
        result = control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=False)
        assert result.returncode != 0, name
        assert message in result.stderr, (name, result.stderr)


def test_the_example_manifests_are_valid_streamqueues(
    control_plane: Any, kube_namespace: str, streamqueue_crd: dict[str, Any]
) -> None:
    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
    assert len(examples) >= 3
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            doc["metadata"]["namespace"] = kube_namespace
            result = control_plane.dry_run(yaml.safe_dump(doc), check=False)
            assert result.returncode == 0, (path.name, result.stderr)


def test_deployment_owned_and_columns_shown(sq: Queues, start_operator: Any) -> None:
    start_operator()
    sq.stream(backlog=7)
    sq.apply("chat", minReplicas=1, maxReplicas=3)
    owner_uid = sq.get("chat")["metadata"]["uid"]
    eventually(lambda: sq.replicas("chat") is not None, "the worker Deployment", timeout=30)
    deployment = k8s.AppsV1Api(sq.api).read_namespaced_deployment("chat-worker", sq.namespace)
    assert deployment.metadata and deployment.metadata.owner_references
    (ref,) = deployment.metadata.owner_references
    assert (ref.kind, ref.name, ref.uid, ref.controller) == ("StreamQueue", "chat", owner_uid, True)
    eventually(lambda: sq.replicas("chat") == 2, "scale to ceil(7/5) = 2", timeout=15)
    eventually(lambda: sq.get("chat").get("status", {}).get("backlog") == 7, "status", timeout=15)

    out = sq.plane.kubectl("get", "streamqueues", "-n", sq.namespace).stdout.splitlines()
    assert out[0].split() == ["NAME", "STREAM", "BACKLOG", "PENDING", "REPLICAS", "READY", "AGE"]
    assert out[1].split()[:5] == ["chat", STREAM, "7", "0", "2/2"]
    short = sq.plane.kubectl("get", "sq", "-n", sq.namespace, "-o", "name").stdout.strip()
    assert short == "streamqueue.streamqueue.io/chat"
    eventually(
        lambda: any("1 -> 2 replicas (Backlog)" in m for _, m in sq.scale_events("chat")),
        "the ScaledUp Event",
        timeout=15,
    )


def test_scales_out_drains_scales_in_to_zero_and_wakes(sq: Queues, start_operator: Any) -> None:
    start_operator()
    r = sq.stream()
    sq.apply(
        "work",
        minReplicas=0,
        maxReplicas=4,
        targetBacklogPerReplica=10,
        scaleDownStabilizationSeconds=3,
        idleCooldownSeconds=3,
    )
    eventually(lambda: sq.replicas("work") == 0, "an idle queue at zero", timeout=30)

    push(r, 200)
    eventually(lambda: sq.replicas("work") == 4, "scale out to maxReplicas", timeout=10)
    runner = WorkerPodRunner(sq.plane.kubeconfig, sq.namespace, "streamqueue.io/queue=work")
    runner.start()
    try:
        eventually(
            lambda: r.xinfo_groups(STREAM)[0]["lag"] == 0 and r.xpending(STREAM, CGROUP)["pending"] == 0,
            "the workers to drain the backlog",
            timeout=60,
        )
        eventually(lambda: sq.replicas("work") == 0, "scale in to zero after the cooldown", timeout=30)
        eventually(
            lambda: any(reason == "ScaledDown" and "(Idle)" in m for reason, m in sq.scale_events("work")),
            "a ScaledDown (Idle) Event",
            timeout=15,
        )

        eventually(
            lambda: not runner.running(), "the scaled-in workers to exit", timeout=60
        )  # else one reads it
        push(r, 1)
        eventually(lambda: sq.replicas("work") == 1, "wake from zero on one message", timeout=10)
        eventually(
            lambda: r.xpending(STREAM, CGROUP)["pending"] == 0 and r.xinfo_groups(STREAM)[0]["lag"] == 0,
            "the woken worker to process it",
            timeout=60,
        )
    finally:
        runner.stop()
    replies = sum(r.xlen(f"ai_to_user:user{i}") for i in range(5))
    assert replies == 201


def test_trimming_removes_only_what_every_group_has_processed(sq: Queues, start_operator: Any) -> None:
    """A second group ("audit") lags behind the workers: the trim stops at its oldest pending entry,
    then at its first undelivered one once it acknowledges; the workers' group never loses one."""
    r = sq.stream()
    r.xgroup_create(STREAM, "audit", id="0")
    push(r, 100)
    ids = [entry_id for entry_id, _ in r.xrange(STREAM)]
    r.xreadgroup("audit", "auditor", {STREAM: ">"}, count=30)
    r.xack(STREAM, "audit", *ids[:20])  # audit: 20 acknowledged, 10 pending, 70 undelivered
    start_operator()
    sq.apply("trim", housekeeping={"trimStream": True}, minReplicas=1, maxReplicas=2)
    runner = WorkerPodRunner(sq.plane.kubeconfig, sq.namespace, "streamqueue.io/queue=trim")
    runner.start()
    try:
        workers = lambda: next(g for g in r.xinfo_groups(STREAM) if g["name"] == CGROUP.encode())  # noqa: E731
        eventually(
            lambda: workers()["lag"] == workers()["pending"] == 0,
            "the workers to process all 100",
            timeout=60,
        )
        eventually(lambda: r.xlen(STREAM) == 80, "a trim up to audit's oldest pending entry", timeout=20)
        assert r.xrange(STREAM, count=1)[0][0] == ids[20]

        r.xack(STREAM, "audit", *ids[20:30])
        eventually(lambda: r.xlen(STREAM) == 70, "a trim up to audit's first undelivered entry", timeout=20)
        assert r.xrange(STREAM, count=1)[0][0] == ids[30]
        assert len(r.xreadgroup("audit", "auditor", {STREAM: ">"}, count=100)[0][1]) == 70
    finally:
        runner.stop()
    assert sum(r.xlen(f"ai_to_user:user{i}") for i in range(5)) == 100


def test_redis_outage_holds_replicas_and_recovers(
    sq: Queues, redis_server: RedisServer, start_operator: Any
) -> None:
    start_operator()
    sq.stream(backlog=10)
    sq.apply(
        "q",
        minReplicas=0,
        maxReplicas=5,
        scaleDownStabilizationSeconds=1,
        idleCooldownSeconds=1,
        coldStartSeconds=0,  # no worker runs, so no pod is ever Ready: no cold-start hold here
    )
    eventually(lambda: sq.replicas("q") == 2, "2 replicas for a backlog of 10", timeout=30)

    redis_server.stop()
    eventually(
        lambda: sq.condition("q", "RedisReachable").get("status") == "False",
        "RedisReachable=False",
        timeout=15,
    )
    ready = sq.condition("q", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RedisUnavailable")
    assert set(steady(lambda: sq.replicas("q"), 4)) == {2}  # well past window + cooldown

    redis_server.start()  # no persistence: the stream and group are gone, as after a real data loss
    eventually(
        lambda: sq.condition("q", "RedisReachable").get("status") == "True",
        "RedisReachable=True again",
        timeout=15,
    )
    assert sq.condition("q", "Ready")["reason"] == "GroupMissing"
    assert sq.replicas("q") == 2  # a missing group holds as well
    sq.stream(backlog=20)
    eventually(lambda: sq.replicas("q") == 4, "scaling resumes after recovery", timeout=15)


def test_operator_restart_causes_no_scaling(sq: Queues, start_operator: Any) -> None:
    operator = start_operator()
    r = sq.stream(backlog=20)
    sq.apply(
        "q",
        minReplicas=1,
        maxReplicas=10,
        scaleDownStabilizationSeconds=60,
    )
    eventually(lambda: sq.replicas("q") == 4, "4 replicas for a backlog of 20", timeout=30)
    entries = r.xreadgroup(CGROUP, "manual", {STREAM: ">"}, count=100)[0][1]
    r.xack(STREAM, CGROUP, *[e[0] for e in entries])  # drained: a fresh operator would scale to 1 at once
    events_before = eventually(
        lambda: (e := sq.scale_events("q")) and any("-> 4 replicas" in m for _, m in e) and e,
        "the scale-up Event",
        timeout=15,
    )

    operator.stop()
    start_operator()
    eventually(lambda: sq.get("q")["status"].get("backlog") == 0, "the new operator's poll", timeout=20)
    assert set(steady(lambda: sq.replicas("q"), 5)) == {4}
    assert sq.scale_events("q") == events_before


def test_dead_consumers_removed_only_after_their_pending_entries_move(
    sq: Queues, start_operator: Any
) -> None:
    start_operator()
    r = sq.stream(backlog=6, decode_responses=True)
    r.xreadgroup(CGROUP, "work-gone-a", {STREAM: ">"}, count=3)  # crashed with 3 entries in flight
    done = r.xreadgroup(CGROUP, "work-gone-b", {STREAM: ">"}, count=1)[0][1]
    r.xack(STREAM, CGROUP, done[0][0])  # finished its work, then its pod went away
    sq.apply("work", minReplicas=0, maxReplicas=2)

    def consumers() -> set[str]:
        return {c["name"] for c in r.xinfo_consumers(STREAM, CGROUP)}

    eventually(lambda: consumers() == {"work-gone-a"}, "the idle dead consumer to be deleted", timeout=30)
    assert r.xpending(STREAM, CGROUP)["pending"] == 3
    assert all(c == {"work-gone-a"} for c in steady(consumers, 6, interval=0.5))
    assert r.xpending(STREAM, CGROUP)["pending"] == 3  # the pass after still kept it: entries pending

    claimed = r.xautoclaim(STREAM, CGROUP, "work-rescuer", min_idle_time=0, start_id="0-0", count=10)[1]
    r.xack(STREAM, CGROUP, *[e[0] for e in claimed])
    eventually(
        lambda: "work-gone-a" not in consumers(), "the drained dead consumer to be deleted", timeout=30
    )
    assert r.xinfo_groups(STREAM)[0]["pending"] == 0 and r.xlen(STREAM) == 6


@pytest.mark.parametrize("scope", ["namespaced", "cluster-wide"])
def test_does_its_whole_job_as_the_charts_service_account(
    sq: Queues, start_operator: Any, scope: str
) -> None:
    """With the chart's ServiceAccount and RBAC (a Role in the watched namespace, or the default
    ClusterRole), the operator creates, scales, reports, records Events and cleans up consumers
    without one refused request. The chart's RBAC is ``permissions.RULES`` (a chart test)."""
    values = ["--set", f"watchNamespaces={{{sq.namespace}}}"] if scope == "namespaced" else []
    manifests = helm(
        "template", "rbac", str(CHART), "--namespace", sq.namespace, "--kube-version", KUBE_VERSION, *values
    ).stdout
    sq.plane.kubectl("apply", "-n", sq.namespace, "-f", "-", input=manifests)
    try:
        kubeconfig = sq.plane.serviceaccount_kubeconfig(sq.namespace, "rbac-streamqueue-operator")
        lease = ("--lease-name=rbac-streamqueue-operator", f"--pod-namespace={sq.namespace}")  # as the chart
        operator = start_operator(*lease, kubeconfig=kubeconfig, scope=None if values else "--all-namespaces")
        r = sq.stream(backlog=1)
        (entry,) = r.xreadgroup(CGROUP, "gone", {STREAM: ">"}, count=1)[0][1]
        r.xack(STREAM, CGROUP, entry[0])  # an idle dead consumer for housekeeping (needs pods: list)
        push(r, 12)
        sq.apply("rbac", minReplicas=1, maxReplicas=5)
        eventually(lambda: sq.replicas("rbac") == 3, "create + scale as the service account", timeout=30)
        eventually(lambda: sq.get("rbac").get("status", {}).get("backlog") == 12, "status", timeout=15)
        eventually(lambda: sq.scale_events("rbac"), "an Event", timeout=15)
        eventually(
            lambda: not r.xinfo_consumers(STREAM, CGROUP), "housekeeping as the service account", timeout=20
        )
        assert "403" not in operator.logs() and "Forbidden" not in operator.logs(), operator.logs()[-3000:]
    finally:
        sq.plane.kubectl("delete", "-n", sq.namespace, "--ignore-not-found", "-f", "-", input=manifests)


def test_all_namespaces_mode_with_metrics_and_liveness(sq: Queues, start_operator: Any) -> None:
    """The chart's default scope (a ClusterRole and --all-namespaces); its metrics and liveness endpoints."""
    metrics_port, liveness_port = free_port(), free_port()
    start_operator(
        f"--metrics-port={metrics_port}", f"--liveness-port={liveness_port}", scope="--all-namespaces"
    )
    sq.stream(backlog=11)
    sq.apply("wide", minReplicas=1, maxReplicas=5)
    eventually(
        lambda: sq.replicas("wide") == 3, "the cluster-wide operator to scale to ceil(11/5) = 3", timeout=30
    )

    labels = f'name="wide",namespace="{sq.namespace}"'
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    for sample in (f"streamqueue_backlog{{{labels}}} 11.0", f"streamqueue_desired_replicas{{{labels}}} 3.0"):
        assert sample in text, sample
    assert f'streamqueue_scale_events_total{{direction="up",{labels},reason="Backlog"}}' in text
    with urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=5) as health:
        assert health.status == 200


def kubeconfig_via(kubeconfig: Path, proxy: PartitionProxy, directory: Path) -> Path:
    """The same credentials, pointed at the proxy (the server certificate is for 127.0.0.1)."""
    config = yaml.safe_load(kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://{proxy.address}"
    path = directory / "via-proxy.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def test_api_partition_holds_reports_and_recovers(sq: Queues, start_operator: Any, tmp_path: Path) -> None:
    """Operator and API server partitioned (requests hang; nothing is refused): replicas are held,
    the backlog stays visible in the metrics and the failed requests are counted. Once the network
    heals the operator scales to the backlog, and does not re-send that patch while its watch,
    cut by the partition, still shows the old count."""
    server = urllib.parse.urlsplit(sq.plane.server)
    with PartitionProxy(server.hostname or "127.0.0.1", server.port or 443) as proxy:
        port = free_port()
        start_operator(
            f"--metrics-port={port}", kubeconfig=kubeconfig_via(sq.plane.kubeconfig, proxy, tmp_path)
        )
        r = sq.stream(backlog=3)
        sq.apply("cut", minReplicas=1, maxReplicas=5)
        eventually(
            lambda: sq.replicas("cut") == 1 and sq.get("cut").get("status", {}).get("backlog") == 3,
            "1 replica and a status for a backlog of 3",
            timeout=30,
        )
        labels = {"namespace": sq.namespace, "name": "cut"}
        up = {**labels, "direction": "up"}

        proxy.partition()
        push(r, 22)  # backlog 25: 5 replicas at the default 5 per replica
        eventually(
            lambda: metric(port, "streamqueue_backlog", labels) == 25,
            "the backlog in the metrics while the API server is unreachable",
            timeout=15,
        )
        eventually(
            lambda: metric(port, "streamqueue_api_errors_total", {**labels, "operation": "scale"}),
            "a scale request that timed out, counted",
            timeout=60,
        )
        assert sq.replicas("cut") == 1
        assert sq.get("cut")["status"]["backlog"] == 3

        proxy.heal()
        eventually(
            lambda: sq.replicas("cut") == 5, "the scale-up once the API server is reachable", timeout=60
        )
        scaled_up = eventually(
            lambda: metric(port, "streamqueue_scale_events_total", up), "the scale-up counted", timeout=10
        )
        eventually(lambda: sq.get("cut")["status"]["backlog"] == 25, "the status to catch up", timeout=60)
        samples = steady(lambda: metric(port, "streamqueue_scale_events_total", up), 8)
        assert set(samples) == {scaled_up}  # the patch was not re-sent while the watch was behind
        assert sq.replicas("cut") == 5


def test_spec_changes_update_the_template_but_never_the_replicas(sq: Queues, start_operator: Any) -> None:
    start_operator()
    sq.stream(backlog=20)
    sq.apply("q", minReplicas=1, maxReplicas=10)
    eventually(lambda: sq.replicas("q") == 4, "4 replicas for a backlog of 20", timeout=30)
    apps = k8s.AppsV1Api(sq.api)

    def pod_spec() -> Any:
        return apps.read_namespaced_deployment("q-worker", sq.namespace).spec.template.spec

    patch = {"spec": {"worker": {"nodeSelector": {"pool": "ai"}, "concurrency": 7}}}
    sq.plane.kubectl("patch", "streamqueue", "q", "-n", sq.namespace, "--type=merge", "-p", json.dumps(patch))
    eventually(lambda: pod_spec().node_selector == {"pool": "ai"}, "the new nodeSelector", timeout=15)
    env = {e.name: e.value for e in pod_spec().containers[0].env}
    assert env["STREAMQUEUE_CONCURRENCY"] == "7"
    assert sq.replicas("q") == 4

    remove = [{"op": "remove", "path": "/spec/worker/nodeSelector"}]
    sq.plane.kubectl("patch", "streamqueue", "q", "-n", sq.namespace, "--type=json", "-p", json.dumps(remove))
    eventually(lambda: pod_spec().node_selector is None, "the nodeSelector to be removed", timeout=15)
    assert sq.replicas("q") == 4
    generation = sq.get("q")["metadata"]["generation"]
    eventually(
        lambda: sq.get("q")["status"]["observedGeneration"] == generation, "observedGeneration", timeout=15
    )


def test_adopts_an_existing_deployment_without_touching_its_replicas(sq: Queues, start_operator: Any) -> None:
    """A Deployment left by an earlier install (no owner reference) is taken over, not recreated."""
    labels = {"app.kubernetes.io/name": "streamqueue-worker", "streamqueue.io/queue": "old"}
    pod = {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "worker", "image": "legacy:1"}]}}
    legacy = {"apiVersion": "apps/v1", "kind": "Deployment",
              "metadata": {"name": "old-worker", "labels": labels},
              "spec": {"replicas": 3, "selector": {"matchLabels": labels}, "template": pod}}  # fmt: skip
    sq.plane.kubectl("apply", "-n", sq.namespace, "-f", "-", input=yaml.safe_dump(legacy))
    uid = k8s.AppsV1Api(sq.api).read_namespaced_deployment("old-worker", sq.namespace).metadata.uid
    sq.stream(backlog=15)  # 3 replicas' worth: the scaler has nothing to change either
    start_operator()
    sq.apply("old", minReplicas=1, maxReplicas=5)

    def adopted() -> Any:
        d = k8s.AppsV1Api(sq.api).read_namespaced_deployment("old-worker", sq.namespace)
        return d.metadata.owner_references and d

    deployment = eventually(adopted, "the owner reference", timeout=30)
    assert deployment.metadata.uid == uid and deployment.spec.replicas == 3
    assert deployment.spec.template.spec.containers[0].image == DEFAULT_WORKER_IMAGE
    assert sq.scale_events("old") == []
