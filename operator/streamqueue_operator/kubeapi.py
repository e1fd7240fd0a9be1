"""Every write the operator makes to the Kubernetes API (and the reads those writes need).

The kubernetes client is synchronous; calls run in a worker thread so one slow API request never
stalls the other queues' poll loops. Every call has a deadline: without one, a request on a
connection that a network partition black-holed would wait for TCP to give up (many minutes) and
hold its queue's poll loop the whole time.

The Deployment's template is replaced with a JSON Patch (so a field removed from the StreamQueue
disappears from the pod) while ``spec.replicas`` is only ever written by ``scale``: reconciling
the template cannot undo a scaling decision.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

from . import metrics
from .models import GROUP, PLURAL, VERSION, SecretKeyRef

HASH_ANNOTATION = f"{GROUP}/template-hash"

# (connect, read) seconds for every API request the operator makes outside kopf.
REQUEST_TIMEOUT = (5.0, 15.0)
_LEASE_THREAD = ThreadPoolExecutor(1, "k8s-lease")
# Scale patches on threads of their own: in the shared pool a queue woken by its first message waited
# behind the status writes of hundreds of busy queues, which fall due on the same ticks (issue 20).
_SCALE_THREADS = ThreadPoolExecutor(4, "k8s-scale")

# What a failed API request raises: an HTTP error status, or a connection that failed or timed out.
API_ERRORS = (ApiException, urllib3.exceptions.HTTPError)


class NotLeader(Exception):
    """A write was refused because this replica does not hold the Lease (or its renew deadline passed)."""


class DeploymentConflict(Exception):
    """The Deployment exists but cannot be adopted (another controller owns it, or its selector differs)."""


class BudgetConflict(Exception):
    """The workers' PodDisruptionBudget exists but another controller owns it."""


@dataclass(frozen=True)
class Applied:
    created: bool
    changed: bool


def template_hash(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _adopt_metadata(
    existing: dict[str, Any], manifest: dict[str, Any], digest: str, conflict: type[Exception]
) -> list[dict[str, Any]]:
    """JSON Patch operations that make ``existing`` ours: labels, the hash, our owner reference.

    Raises ``conflict`` when another controller owns the object; the test on ``resourceVersion``
    makes the whole patch fail if the object changed since it was read.
    """
    meta = existing["metadata"]
    ours = manifest["metadata"]["ownerReferences"][0]
    others = [r for r in meta.get("ownerReferences") or [] if r.get("uid") != ours["uid"]]
    controllers = [r for r in others if r.get("controller")]
    if controllers:
        c = controllers[0]
        raise conflict(
            f"{manifest['kind']} {meta['name']} is controlled by {c.get('kind')}/{c.get('name')}; "
            "delete it or rename the StreamQueue"
        )
    labels = {**(meta.get("labels") or {}), **manifest["metadata"]["labels"]}
    annotations = {**(meta.get("annotations") or {}), HASH_ANNOTATION: digest}
    return [
        {"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]},
        {"op": "add", "path": "/metadata/labels", "value": labels},
        {"op": "add", "path": "/metadata/annotations", "value": annotations},
        {"op": "add", "path": "/metadata/ownerReferences", "value": [*others, ours]},
    ]


def budget_patch(existing: dict[str, Any], manifest: dict[str, Any], digest: str) -> list[dict[str, Any]]:
    """JSON Patch that makes an existing PodDisruptionBudget ``manifest`` (its whole spec is mutable)."""
    spec = {"op": "replace", "path": "/spec", "value": manifest["spec"]}
    return [*_adopt_metadata(existing, manifest, digest, BudgetConflict), spec]


def adoption_patch(existing: dict[str, Any], manifest: dict[str, Any], digest: str) -> list[dict[str, Any]]:
    """JSON Patch that makes ``existing`` match ``manifest`` everywhere except ``spec.replicas``."""
    meta = existing["metadata"]
    adopt = _adopt_metadata(existing, manifest, digest, DeploymentConflict)
    if existing["spec"]["selector"] != manifest["spec"]["selector"]:
        raise DeploymentConflict(
            f"Deployment {meta['name']} has selector {existing['spec']['selector']}, expected "
            f"{manifest['spec']['selector']} (selectors are immutable): delete the Deployment"
        )
    return [
        *adopt,
        {"op": "replace", "path": "/spec/template", "value": manifest["spec"]["template"]},
        {"op": "replace", "path": "/spec/strategy", "value": manifest["spec"]["strategy"]},
        {
            "op": "add",
            "path": "/spec/revisionHistoryLimit",
            "value": manifest["spec"]["revisionHistoryLimit"],
        },
    ]


def _owned_by(existing: dict[str, Any], manifest: dict[str, Any]) -> bool:
    uid = manifest["metadata"]["ownerReferences"][0]["uid"]
    return any(r.get("uid") == uid for r in existing["metadata"].get("ownerReferences") or [])


def load_api_client(connections: int) -> k8s.ApiClient:
    """In-cluster credentials when running in a Pod, else the kubeconfig (KUBECONFIG or ~/.kube/config).

    ``connections`` sizes the HTTP pool to the number of threads that call the API concurrently.
    """
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = connections
    return k8s.ApiClient(configuration)


class Cluster:
    """The operator's API calls; see docs/operator.md "Permissions" for the verbs they need.

    Every write to a worker Deployment or PodDisruptionBudget, a StreamQueue's status or a Pod goes
    through ``fence`` first: with leader election, ``leading`` is the elector's clock-based check, so
    a replica that is not (or no longer) the leader sends nothing, whatever its caller decided a
    moment ago.
    """

    def __init__(
        self,
        api_client: k8s.ApiClient,
        leading: Callable[[], bool] = lambda: True,
        manager: str = "streamqueue-operator",
    ) -> None:
        self._api = api_client
        self.leading = leading
        self.manager = manager  # the field manager in managedFields: which replica wrote
        self.apps = k8s.AppsV1Api(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.custom = k8s.CustomObjectsApi(api_client)
        self.coordination = k8s.CoordinationV1Api(api_client)
        self.policy = k8s.PolicyV1Api(api_client)

    def fence(self, count_sent: bool = True) -> None:
        if not self.leading():
            metrics.WRITES.labels("refused").inc()
            raise NotLeader("not the leader: write skipped")
        if count_sent:
            metrics.WRITES.labels("sent").inc()

    def _fenced(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """``method``, checking the fence again on the API thread just before the request goes out.

        The check on the event loop is not enough: a call may then wait for a thread, and the whole
        process may be paused (SIGSTOP, a VM or GC pause) past its lease in between. The two-node
        test's frozen leader sent such a write after SIGCONT, once the standby had taken over.
        """

        def call(*args: Any, **kwargs: Any) -> Any:
            self.fence()
            return method(*args, **kwargs)

        return call

    async def _write(self, method: Callable[..., Any], *args: Any, executor: Executor | None = None) -> Any:
        """A write under this replica's field manager, fenced on the loop and again on its thread."""
        self.fence(count_sent=False)
        return await _call(self._fenced(method), *args, _executor=executor, field_manager=self.manager)

    def _sanitized(self, obj: Any) -> dict[str, Any]:
        return self._api.sanitize_for_serialization(obj)

    async def apply_deployment(
        self,
        manifest: dict[str, Any],
        initial_replicas: int,
        before_rollout: Callable[[], None] | None = None,
    ) -> Applied:
        """Create the worker Deployment, or adopt and update an existing one (template only).

        ``before_rollout`` runs only when the update would change the pod template, that is restart
        the workers (a server-side dry run of the patch tells, defaults and all); raising stops the
        update (the operator's rollout stagger). Other changes (labels, owner reference) go through.
        """
        apps = self.apps
        body = {**manifest, "spec": {**manifest["spec"], "replicas": initial_replicas}}
        verbs = (
            apps.read_namespaced_deployment,
            apps.create_namespaced_deployment,
            apps.patch_namespaced_deployment,
        )
        return await self._apply(manifest, body, verbs, adoption_patch, before_rollout)

    async def apply_disruption_budget(self, manifest: dict[str, Any]) -> Applied:
        """Create the workers' PodDisruptionBudget, or adopt and update an existing one."""
        policy = self.policy
        verbs = (
            policy.read_namespaced_pod_disruption_budget,
            policy.create_namespaced_pod_disruption_budget,
            policy.patch_namespaced_pod_disruption_budget,
        )
        return await self._apply(manifest, manifest, verbs, budget_patch)

    async def _apply(
        self,
        manifest: dict[str, Any],
        create_body: dict[str, Any],
        verbs: tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]],
        patch_for: Callable[[dict[str, Any], dict[str, Any], str], list[dict[str, Any]]],
        before_rollout: Callable[[], None] | None = None,
    ) -> Applied:
        """Create ``create_body`` (``manifest`` plus what only creation sets), or, when the object
        exists and its hash annotation differs from ``manifest``'s, send ``patch_for``'s JSON Patch."""
        read, create, patch = verbs
        meta = manifest["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        digest = template_hash(manifest)
        try:
            existing = self._sanitized(await _call(read, name, namespace))
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {**create_body, "metadata": {**meta, "annotations": {HASH_ANNOTATION: digest}}}
            await self._write(create, namespace, body)
            return Applied(created=True, changed=True)
        annotations = existing["metadata"].get("annotations") or {}
        if annotations.get(HASH_ANNOTATION) == digest and _owned_by(existing, manifest):
            return Applied(created=False, changed=False)
        operations = patch_for(existing, manifest, digest)
        if before_rollout is not None:
            preview = await _call(patch, name, namespace, operations, dry_run="All")
            if self._sanitized(preview)["spec"]["template"] != existing["spec"]["template"]:
                before_rollout()
        await self._write(patch, name, namespace, operations)
        return Applied(created=False, changed=True)

    async def scale(self, namespace: str, deployment: str, replicas: int) -> None:
        body = {"spec": {"replicas": replicas}}
        await self._write(
            self.apps.patch_namespaced_deployment, deployment, namespace, body, executor=_SCALE_THREADS
        )

    async def deployment_replicas(self, namespace: str, deployment: str) -> int | None:
        """``spec.replicas`` read from the API server itself, for when the watch may be behind."""
        found = await _call(self.apps.read_namespaced_deployment, deployment, namespace)
        return found.spec.replicas if found.spec else None

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self._write(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
        )

    async def secret_value(self, namespace: str, ref: SecretKeyRef) -> str:
        """One key of a Secret, decoded; a clear error names the Secret and key when it is missing."""
        try:
            secret = await _call(self.core.read_namespaced_secret, ref.name, namespace)
        except API_ERRORS as exc:
            why = f"{exc.status} {exc.reason}" if isinstance(exc, ApiException) else str(exc)
            raise LookupError(f"cannot read Secret {namespace}/{ref.name}: {why}") from exc
        data = secret.data or {}
        if ref.key not in data:
            raise LookupError(f"Secret {namespace}/{ref.name} has no key {ref.key!r}")
        return base64.b64decode(data[ref.key]).decode()

    async def pod_names(self, namespace: str, label_selector: str) -> set[str]:
        pods = await _call(self.core.list_namespaced_pod, namespace, label_selector=label_selector)
        return {p.metadata.name for p in pods.items if p.metadata and p.metadata.name}

    async def pod_annotation(self, namespace: str, label_selector: str, key: str) -> dict[str, str | None]:
        """Pod name -> its annotation ``key``, for the selected pods that are not being deleted."""
        pods = await _call(self.core.list_namespaced_pod, namespace, label_selector=label_selector)
        return {
            p.metadata.name: (p.metadata.annotations or {}).get(key)
            for p in pods.items
            if p.metadata and p.metadata.name and not p.metadata.deletion_timestamp
        }

    async def annotate_pod(self, namespace: str, pod: str, key: str, value: str) -> None:
        body = {"metadata": {"annotations": {key: value}}}
        await self._write(self.core.patch_namespaced_pod, pod, namespace, body)

    async def read_lease(self, namespace: str, name: str, seconds: float) -> dict[str, Any] | None:
        """The Lease as a dict, or None when it does not exist yet (Lease calls are never fenced)."""
        try:
            lease = await _lease_call(
                self.coordination.read_namespaced_lease, name, namespace, seconds=seconds
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return self._sanitized(lease)

    async def create_lease(
        self, namespace: str, name: str, spec: dict[str, Any], seconds: float
    ) -> dict[str, Any]:
        body = {"metadata": {"name": name, "namespace": namespace}, "spec": spec}
        created = await _lease_call(
            self.coordination.create_namespaced_lease, namespace, body, seconds=seconds
        )
        return self._sanitized(created)

    async def replace_lease(
        self, namespace: str, name: str, lease: dict[str, Any], seconds: float
    ) -> dict[str, Any]:
        """PUT with the read resourceVersion: of two replicas writing at once, one gets a 409."""
        replaced = await _lease_call(
            self.coordination.replace_namespaced_lease, name, namespace, lease, seconds=seconds
        )
        return self._sanitized(replaced)

    async def lease_event(self, namespace: str, lease: str, uid: str | None, message: str) -> None:
        """A ``LeaderElection`` Event on the Lease, where client-go's elections record theirs."""
        now = datetime.now(UTC)
        body = {
            "metadata": {"generateName": f"{lease}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "name": lease, "namespace": namespace, "uid": uid,
            },
            "reason": "LeaderElection",
            "message": message,
            "type": "Normal",
            "source": {"component": "streamqueue-operator"},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }  # fmt: skip
        await _call(self.core.create_namespaced_event, namespace, body)


async def _call(
    method: Any,
    *args: Any,
    _timeout: tuple[float, float] = REQUEST_TIMEOUT,
    _executor: Executor | None = None,
    **kwargs: Any,
) -> Any:
    """One API request in a worker thread (of ``_executor``, else the shared default pool), with the
    operator's deadline (or a shorter one)."""
    call = functools.partial(method, *args, _request_timeout=_timeout, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_executor, call)


async def _lease_call(method: Any, *args: Any, seconds: float) -> Any:
    """A Lease request on the Lease's own thread: in the shared pool it waited behind hundreds of
    queues' status and scale writes (measured at 2,000 queues) past the renew deadline, and the
    leader stepped down with nothing wrong."""
    return await _call(method, *args, _timeout=(seconds, seconds), _executor=_LEASE_THREAD)
