"""The operator in this test's process (``kopf.testing.KopfRunner``), against the real kube-apiserver and
a real redis-server: kopf's own way to test a whole operator, without a subprocess.

In process, a test can read what the operator logged and could patch what it calls (a clock, the
Redis client); the subprocess tests (``start_operator``) keep covering the command line, signals
and the metrics server.
"""

from __future__ import annotations

from typing import Any

import pytest
from kopf.testing import KopfRunner
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from kubernetes.config import kube_config
from streamqueue_harness.eventually import eventually
from streamqueue_operator import handlers
from streamqueue_operator.kubeapi import Cluster

from tests.operator.queues import Queues

pytestmark = pytest.mark.kube


@pytest.fixture
def in_process_env(control_plane: Any, kube_namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``kopf run`` without the CLI reads: the kubeconfig and the operator's settings, from the env."""
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    # The kubernetes client read KUBECONFIG once, at import: its default must follow too.
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(control_plane.kubeconfig))
    monkeypatch.setenv("STREAMQUEUE_OPERATOR_NAMESPACE", kube_namespace)  # the Lease lives there too
    monkeypatch.setenv("STREAMQUEUE_OPERATOR_STATUS_MIN_INTERVAL", "1")


def test_scales_a_backlog_with_the_operator_in_process(
    sq: Queues, kube_namespace: str, streamqueue_crd: dict[str, Any], in_process_env: None
) -> None:
    sq.stream(backlog=7)
    args = ["run", "--standalone", f"--namespace={kube_namespace}", "-m", "streamqueue_operator.handlers"]
    with KopfRunner(args, timeout=60) as runner:
        sq.apply("chat", minReplicas=1, maxReplicas=3)
        eventually(lambda: sq.replicas("chat") == 2, "scale to ceil(7/5) = 2", timeout=30)
        eventually(lambda: sq.get("chat").get("status", {}).get("backlog") == 7, "the status", timeout=15)
        eventually(
            lambda: any("1 -> 2 replicas (Backlog)" in m for _, m in sq.scale_events("chat")),
            "the ScaledUp Event",
            timeout=15,
        )
    assert runner.exit_code == 0, runner.output
    assert runner.exception is None


def test_a_template_change_the_api_server_refuses_is_applied_again(
    sq: Queues,
    kube_namespace: str,
    streamqueue_crd: dict[str, Any],
    in_process_env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first update after a spec edit fails with a 409 (the resourceVersion check, lost to a status
    write): the operator applies the edit again after its error backoff, not at the next spec edit."""
    sq.stream()
    refuse: list[bool] = []  # the test arms it; the operator's loop pops it once
    apply = Cluster.apply_deployment

    async def refused_once(self: Cluster, *args: Any, **kwargs: Any) -> Any:
        if refuse:
            refuse.pop()
            raise ApiException(status=409, reason="Conflict")
        return await apply(self, *args, **kwargs)

    monkeypatch.setattr(Cluster, "apply_deployment", refused_once)
    apps = k8s.AppsV1Api(sq.api)

    def annotations() -> dict[str, str]:
        deployment = apps.read_namespaced_deployment("chat-worker", kube_namespace)
        return deployment.spec.template.metadata.annotations or {}

    args = ["run", "--standalone", f"--namespace={kube_namespace}", "-m", "streamqueue_operator.handlers"]
    with KopfRunner(args, timeout=60) as runner:
        sq.apply("chat", minReplicas=1)
        eventually(lambda: sq.replicas("chat") == 1, "the Deployment", timeout=30)
        refuse.append(True)
        sq.apply("chat", minReplicas=1, worker={"podAnnotations": {"edited": "yes"}})
        eventually(lambda: not refuse, "the refused update", timeout=15)
        wait = handlers.POLL_ERROR_BACKOFF_SECONDS + 10
        eventually(lambda: annotations().get("edited") == "yes", "the edit, applied again", timeout=wait)
    assert runner.exit_code == 0, runner.output
    assert f"Deployment not ensured; retrying in {handlers.POLL_ERROR_BACKOFF_SECONDS:.0f}s" in runner.output
