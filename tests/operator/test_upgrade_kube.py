"""Upgrades on the real control plane: the previous release to this one with queues live, and the
rollout stagger when the operator's default worker image changes (docs/upgrading.md).

The previous release: v0.1.0 was never tagged (VERSION has said 0.1.0 since the first commit), so
the commit before this release's API and upgrade changes stands in for it. Its operator runs as a
process from its own sources (``git archive``, on PYTHONPATH ahead of the installed packages), its
chart and CRD are installed with helm, exactly as a user of that release has them.
"""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from streamqueue_harness.controlplane import REPO_ROOT
from streamqueue_harness.eventually import eventually
from streamqueue_harness.helm import CHART, helm
from streamqueue_harness.operatorproc import OperatorProcess, install_crd
from streamqueue_operator.models import GROUP, PLURAL

from tests.operator.queues import Queues, push

PREVIOUS_RELEASE = "5f9ab40fe33f8b18b937fb78e4d146371af7ec3d"
CRD = f"{PLURAL}.{GROUP}"
QUEUES = ("alpha", "beta", "gamma")
RELEASE = "sq"
PARTS = ("operator", "worker", "charts", "crds")  # what the test takes from the previous release
# A StreamQueue that no operator here watches, so nothing rewrites it but the storage migration.
UNWATCHED = ("default", "upgrade-unwatched")
# docs/upgrading.md, "API versions"
REWRITE_EVERY_QUEUE = """
kubectl get streamqueues -A -o custom-columns=NS:.metadata.namespace,NAME:.metadata.name --no-headers |
  while read -r ns name; do kubectl patch streamqueue -n "$ns" "$name" --type=merge -p '{}'; done
"""
UNWATCHED_QUEUE = {
    "apiVersion": f"{GROUP}/v1alpha1",
    "kind": "StreamQueue",
    "metadata": {"namespace": UNWATCHED[0], "name": UNWATCHED[1]},
    "spec": {},
}


def _previous_release(into: Path) -> Path:
    """The previous release's sources (operator, worker, chart, CRD) extracted from git."""
    archive = subprocess.run(
        # safe.directory: CI runs the tests as root in a checkout that another user owns
        ["git", "-c", "safe.directory=*", "-C", str(REPO_ROOT), "archive", PREVIOUS_RELEASE, *PARTS],
        capture_output=True,
    )
    if archive.returncode != 0:
        # Only a checkout without the history lacks the commit (a shallow clone); pytest -ra prints why,
        # and the contributors' workflow fetches the whole history so the test runs there.
        pytest.skip(
            f"previous release {PREVIOUS_RELEASE[:7]} not in this checkout "
            f"({archive.stderr.decode().strip()}): run git fetch --unshallow to test the upgrade"
        )
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _workers(api: k8s.ApiClient, namespace: str) -> dict[str, Any]:
    """What tells whether workers restarted: pod templates, rollout revisions, ReplicaSets, Pod UIDs.

    Not ``metadata.generation``: a Deployment counts an annotation change too (the operator's hash
    annotation changes with the owner reference's apiVersion), and those start no rollout.
    """
    apps, core = k8s.AppsV1Api(api), k8s.CoreV1Api(api)
    deployments = apps.list_namespaced_deployment(namespace, label_selector=f"{GROUP}/queue").items
    replica_sets = apps.list_namespaced_replica_set(namespace, label_selector=f"{GROUP}/queue").items
    pods = core.list_namespaced_pod(namespace, label_selector=f"{GROUP}/queue").items
    return {
        "templates": {d.metadata.name: api.sanitize_for_serialization(d.spec.template) for d in deployments},
        "revisions": {
            d.metadata.name: (d.metadata.annotations or {}).get("deployment.kubernetes.io/revision")
            for d in deployments
        },
        "replicas": {d.metadata.name: d.spec.replicas for d in deployments},
        "replica_sets": sorted(rs.metadata.uid for rs in replica_sets),
        "pods": sorted(p.metadata.uid for p in pods),
    }


def _settled(workers: dict[str, Any]) -> dict[str, Any] | None:
    """``workers`` once every queue runs 2 replicas whose pods exist, in a rollout revision; else None."""
    scaled = workers["replicas"] == {f"{q}-worker": 2 for q in QUEUES}
    revised = len(workers["revisions"]) == len(QUEUES) and None not in workers["revisions"].values()
    return workers if scaled and revised and len(workers["pods"]) == 2 * len(QUEUES) else None


@contextmanager
def _replica_watch(plane: Any, namespace: str) -> Iterator[list[str]]:
    """Every ``<deployment> <spec.replicas>`` the API server reports while the block runs."""
    template = '{.metadata.name} {.spec.replicas}{"\\n"}'
    cmd = [str(plane.bin_dir / "kubectl"), "--kubeconfig", str(plane.kubeconfig), "-n", namespace]
    cmd += ["get", "deployments", "-l", f"{GROUP}/queue", "--watch", "-o", f"jsonpath={template}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        yield seen
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        seen.extend(line for line in out.splitlines() if line.strip())


def _owner_versions(api: k8s.ApiClient, namespace: str) -> set[str]:
    deployments = k8s.AppsV1Api(api).list_namespaced_deployment(namespace, label_selector=f"{GROUP}/queue")
    return {ref.api_version for d in deployments.items for ref in d.metadata.owner_references or []}


def test_helm_upgrade_from_the_previous_release_keeps_every_worker(
    control_plane: Any, kube_namespace: str, sq: Queues, api: k8s.ApiClient, tmp_path: Path
) -> None:
    previous = _previous_release(tmp_path / "previous")
    ns, kubeconfig = kube_namespace, control_plane.kubeconfig
    scope = f"--namespace={ns}"
    values = ["--namespace", ns, "--set", f"watchNamespaces={{{ns}}}"]
    old = OperatorProcess(
        kubeconfig,
        scope,
        tmp_path,
        "--status-min-interval=1",
        pythonpath=(previous / "operator", previous / "worker"),
    )
    new = OperatorProcess(kubeconfig, scope, tmp_path, "--status-min-interval=1")
    # A cluster that has only ever had the previous release: helm creates its CRD from crds/.
    _release_leftover_queues(control_plane)
    control_plane.kubectl("delete", "crd", CRD, "--ignore-not-found", "--wait=true", "--timeout=60s")
    try:
        helm(
            "install",
            RELEASE,
            str(previous / "charts" / "streamqueue-operator"),
            *values,
            kubeconfig=kubeconfig,
        )
        control_plane.wait_established(CRD)
        old.start()
        r = sq.stream(backlog=4)
        for name in QUEUES:
            sq.apply(name, version="v1alpha1", targetBacklogPerReplica=2, maxReplicas=4)
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(UNWATCHED_QUEUE))
        before = eventually(
            lambda: _settled(_workers(api, ns)),
            "each queue scaled to ceil(4/2) = 2 by the previous release, its pods created",
            timeout=60,
        )
        events_before = {q: sq.scale_events(q) for q in QUEUES}

        with _replica_watch(control_plane, ns) as seen:
            # The upgrade, as docs/upgrading.md tells the user: the CRD first (helm never upgrades crds/) ...
            # helm created it, so helm owns .spec.versions: a plain server-side apply is refused.
            apply = ("apply", "--server-side", "-f", str(REPO_ROOT / "crds" / f"{CRD}.yaml"))
            refused = control_plane.kubectl(*apply, check=False)
            assert refused.returncode != 0 and 'conflict with "helm"' in refused.stderr, refused.stderr
            control_plane.kubectl(*apply, "--force-conflicts")
            control_plane.wait_established(CRD)
            # ... then the chart. Its operator Deployment rolls (a new pod, then the old one stops,
            # handing the Lease over): here the new process starts, then the old one is stopped.
            helm("upgrade", RELEASE, str(CHART), *values, kubeconfig=kubeconfig)
            new.start()
            old.stop()
            eventually(
                lambda: _owner_versions(api, ns) == {f"{GROUP}/v1beta1"},
                "the new operator has ensured every Deployment (its owner references name v1beta1)",
                timeout=60,
            )
        after = _workers(api, ns)
        assert after == before, "an upgrade that does not change the pod template restarted workers"
        assert {line.split()[1] for line in seen} == {"2"}, f"replicas changed during the upgrade: {seen}"
        assert {q: sq.scale_events(q) for q in QUEUES} == events_before
        assert "RolloutDeferred" not in control_plane.kubectl("get", "events", "-n", ns).stdout

        # Both versions serve the same objects; v1beta1 is the storage version from now on.
        for version in ("v1alpha1", "v1beta1"):
            listed = control_plane.kubectl(
                "get", f"{PLURAL}.{version}.{GROUP}", "-n", ns, "-o", "name"
            ).stdout
            assert sorted(listed.split()) == [f"streamqueue.{GROUP}/{q}" for q in QUEUES], version
        push(r, 4)  # the new operator scales the queues it took over
        eventually(lambda: sq.replicas(QUEUES[0]) == 4, "ceil(8/2) = 4 replicas", timeout=30)

        # Storage: the operator's status writes stored its queues as v1beta1 already; the one it
        # does not watch is still stored as v1alpha1 until the migration rewrites it.
        assert _stored_versions(control_plane) == ["v1alpha1", "v1beta1"]
        assert _stored_as(control_plane)[UNWATCHED] == f"{GROUP}/v1alpha1"
        _migrate_storage(control_plane)
        assert set(_stored_as(control_plane).values()) == {f"{GROUP}/v1beta1"}
        assert _stored_versions(control_plane) == ["v1beta1"]
        for version in ("v1alpha1", "v1beta1"):  # still served, both
            control_plane.kubectl("get", f"{PLURAL}.{version}.{GROUP}", "-n", ns, QUEUES[0])
    finally:
        new.stop()
        old.stop()
        control_plane.kubectl("delete", PLURAL, "-n", UNWATCHED[0], UNWATCHED[1], "--ignore-not-found")
        helm("uninstall", RELEASE, "--namespace", ns, "--wait", kubeconfig=kubeconfig, check=False)
        install_crd(control_plane)  # the session's other tests expect this release's CRD


def _release_leftover_queues(plane: Any) -> None:
    """Drop kopf's finalizer from StreamQueues that earlier tests' operators left behind: with no
    operator running to remove it, deleting the CRD would wait for those objects forever."""
    listing = json.loads(plane.kubectl("get", PLURAL, "-A", "-o", "json").stdout)
    for item in listing["items"]:
        meta = item["metadata"]
        if meta.get("finalizers"):
            patch = json.dumps({"metadata": {"finalizers": None}})
            where = ("-n", meta["namespace"], meta["name"])
            plane.kubectl("patch", PLURAL, *where, "--type=merge", "-p", patch, check=False)


def _stored_versions(plane: Any) -> list[str]:
    crd = json.loads(plane.kubectl("get", "crd", CRD, "-o", "json").stdout)
    return sorted(crd["status"]["storedVersions"])


def _stored_as(plane: Any) -> dict[tuple[str, str], str]:
    """(namespace, name) -> the apiVersion each StreamQueue is stored as, read from etcd itself."""
    prefix = f"/registry/{GROUP}/{PLURAL}/"
    query = {"key": _b64(prefix), "range_end": _b64(prefix[:-1] + "0")}  # every key under the prefix
    request = urllib.request.Request(f"{plane.etcd_url}/v3/kv/range", json.dumps(query).encode())
    with urllib.request.urlopen(request, timeout=10) as response:
        kvs = json.load(response).get("kvs", [])
    stored = {}
    for kv in kvs:
        namespace, name = base64.b64decode(kv["key"]).decode().removeprefix(prefix).split("/")
        stored[(namespace, name)] = json.loads(base64.b64decode(kv["value"]))["apiVersion"]
    return stored


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _migrate_storage(plane: Any) -> None:
    """docs/upgrading.md's storage migration, its shell loop as written there: rewrite every object
    (an empty patch), then drop v1alpha1 from storedVersions."""
    assert REWRITE_EVERY_QUEUE.strip() in (REPO_ROOT / "docs" / "upgrading.md").read_text()
    env = {"PATH": f"{plane.bin_dir}:/usr/bin:/bin", "KUBECONFIG": str(plane.kubeconfig)}
    subprocess.run(["bash", "-euo", "pipefail", "-c", REWRITE_EVERY_QUEUE], env=env, check=True, timeout=120)
    patch = json.dumps({"status": {"storedVersions": ["v1beta1"]}})
    plane.kubectl("patch", "crd", CRD, "--subresource=status", "--type=merge", "-p", patch)


def test_a_new_default_worker_image_rolls_out_one_queue_at_a_time(
    sq: Queues, start_operator: Any, api: k8s.ApiClient
) -> None:
    stagger = 3.0
    sq.stream(backlog=2)
    for name in QUEUES:
        sq.apply(name, targetBacklogPerReplica=2)
    first = start_operator(
        "--worker-image=streamqueue/worker:previous", f"--rollout-stagger-seconds={stagger}"
    )
    eventually(
        lambda: _images(api, sq.namespace) == dict.fromkeys(QUEUES, "previous"), "Deployments", timeout=60
    )
    first.stop()

    start_operator("--worker-image=streamqueue/worker:next", f"--rollout-stagger-seconds={stagger}")
    rolled: dict[str, float] = {}

    def all_rolled() -> bool:
        for queue, tag in _images(api, sq.namespace).items():
            if tag == "next":
                rolled.setdefault(queue, time.monotonic())
        return len(rolled) == len(QUEUES)

    eventually(all_rolled, "every queue on the new default image", timeout=60, interval=0.05)
    times = sorted(rolled.values())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap > stagger - 0.5 for gap in gaps), gaps
    deferred = sq.plane.kubectl(
        "get", "events", "-n", sq.namespace, "--field-selector=reason=RolloutDeferred", "-o", "name"
    ).stdout.split()
    assert len(deferred) >= len(QUEUES) - 1


def _images(api: k8s.ApiClient, namespace: str) -> dict[str, str]:
    """Queue -> tag of its workers' image, for the queues whose Deployment exists."""
    deployments = k8s.AppsV1Api(api).list_namespaced_deployment(namespace, label_selector=f"{GROUP}/queue")
    return {
        d.metadata.name.removesuffix("-worker"): d.spec.template.spec.containers[0].image.rsplit(":", 1)[1]
        for d in deployments.items
    }


def test_a_spec_edit_rolls_out_at_once_while_the_operator_s_own_change_waits(
    sq: Queues, start_operator: Any, api: k8s.ApiClient
) -> None:
    queues = QUEUES[:2]
    sq.stream(backlog=2)
    for name in queues:
        sq.apply(name, targetBacklogPerReplica=2)
    first = start_operator("--worker-image=streamqueue/worker:previous")
    eventually(
        lambda: _images(api, sq.namespace) == dict.fromkeys(queues, "previous"), "Deployments", timeout=60
    )
    first.stop()

    start_operator("--worker-image=streamqueue/worker:next", "--rollout-stagger-seconds=600")
    waiting = eventually(lambda: _deferred(sq), "a queue waiting for its turn", timeout=60)
    assert sorted(_images(api, sq.namespace).values()) == ["next", "previous"]
    # The user's own change to the waiting queue is not the operator's to delay (and takes the image along).
    sq.apply(waiting, targetBacklogPerReplica=2, worker={"podAnnotations": {"edited": "yes"}})
    eventually(
        lambda: _images(api, sq.namespace)[waiting] == "next", "the edited queue rolled out", timeout=30
    )


def _deferred(sq: Queues) -> str | None:
    """The queue with a RolloutDeferred Event, if any."""
    out = sq.plane.kubectl(
        "get", "events", "-n", sq.namespace, "--field-selector=reason=RolloutDeferred",
        "-o", "jsonpath={.items[*].involvedObject.name}",
    ).stdout.split()  # fmt: skip
    return out[0] if out else None
