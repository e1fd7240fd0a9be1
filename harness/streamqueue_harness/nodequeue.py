"""A StreamQueue on the real node, driven as a user drives it: `helm install`, `kubectl apply`, XADD.

Shared by the node's end-to-end test and the cold-start benchmark. The queue is the README's example
(`examples/streamqueue.yaml`) with its Redis at the example's `redis://redis:6379/0`: a Redis
StatefulSet behind the Service `redis` (``deploy_redis``), found through cluster DNS, with its password
in the Secret the example references; the HTTP handler calls ``ModelStandIn``, a stand-in for the
model server an AI worker awaits, so messages take real time and a burst builds a backlog the
operator must scale out for.
"""

from __future__ import annotations

import base64
import json
import secrets
import string
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import kubernetes.client
import kubernetes.watch
import redis
import yaml

from .controlplane import REPO_ROOT, ControlPlane
from .helm import CHART, helm
from .ports import free_port

EXAMPLE = REPO_ROOT / "examples" / "streamqueue.yaml"
REDIS_MANIFEST = Path(__file__).with_name("manifests") / "redis.yaml"
RELEASE = "streamqueue"
OPERATOR_NAMESPACE = "streamqueue-system"
NAMESPACE = "default"
QUEUE = "chat"
DEPLOYMENT = f"{QUEUE}-worker"
POD_SELECTOR = f"streamqueue.io/queue={QUEUE}"
REDIS_SECRET = "redis-auth"
STREAM = "user_messages_queue"
REPLY_PREFIX = "ai_to_user:"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


def install_operator(plane: ControlPlane, timeout_s: int = 180) -> None:
    """The README's install command, waiting until the operator's pod runs."""
    helm(
        "install", RELEASE, str(CHART), "-n", OPERATOR_NAMESPACE, "--create-namespace",
        "--wait", f"--timeout={timeout_s}s", kubeconfig=plane.kubeconfig, timeout=timeout_s + 60,
    )  # fmt: skip


def create_redis_secret(plane: ControlPlane, password: str) -> None:
    plane.kubectl(
        "create", "secret", "generic", REDIS_SECRET, "-n", NAMESPACE, f"--from-literal=password={password}"
    )


def deploy_redis(plane: ControlPlane, image: str, timeout_s: int = 120, node: str | None = None) -> str:
    """The Redis StatefulSet and Service ``redis`` (password from the Secret), Ready; returns the ClusterIP.

    The test process reaches Redis at that Service IP: it runs in the node's network namespace, where
    kube-proxy's rules translate Service IPs for local processes as they do for pods. ``node`` pins
    Redis there (its data is an emptyDir: a test that drains or stops another node keeps it).
    """
    manifest = string.Template(REDIS_MANIFEST.read_text()).substitute(image=image)
    if node is not None:
        documents = list(yaml.safe_load_all(manifest))
        for document in documents:
            if document["kind"] == "StatefulSet":
                document["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
        manifest = yaml.safe_dump_all(documents)
    apply(plane, manifest)
    plane.kubectl(
        "rollout", "status", "statefulset/redis", "-n", NAMESPACE, f"--timeout={timeout_s}s",
        timeout=timeout_s + 30,
    )  # fmt: skip
    return plane.kubectl(
        "get", "service", "redis", "-n", NAMESPACE, "-o", "jsonpath={.spec.clusterIP}"
    ).stdout


def redis_in_cluster(plane: ControlPlane, image: str, node: str | None = None) -> redis.Redis:
    """Redis as users run it, with a fresh password in its Secret (``deploy_redis``); a client for the
    test at the Service's ClusterIP. The caller closes it."""
    password = secrets.token_hex(16)
    create_redis_secret(plane, password)
    service_ip = deploy_redis(plane, image, node=node)
    return redis.Redis(host=service_ip, port=6379, password=password, decode_responses=True)


def ensure_redis(plane: ControlPlane, image: str) -> redis.Redis:
    """The Redis of ``redis_in_cluster``, deployed unless another test of the session did; a client."""
    if plane.kubectl("get", "statefulset", "redis", "-n", NAMESPACE, check=False).returncode != 0:
        return redis_in_cluster(plane, image)
    ip = plane.kubectl("get", "service", "redis", "-n", NAMESPACE, "-o", "jsonpath={.spec.clusterIP}").stdout
    return redis.Redis(host=ip, port=6379, password=redis_password(plane), decode_responses=True)


def redis_password(plane: ControlPlane) -> str:
    """The password in the queue's Secret."""
    encoded = plane.kubectl(
        "get", "secret", REDIS_SECRET, "-n", NAMESPACE, "-o", "jsonpath={.data.password}"
    ).stdout
    return base64.b64decode(encoded).decode()


def example_queue(
    redis_url: str | None, handler_url: str, worker: dict[str, Any], scaling: dict[str, Any]
) -> dict[str, Any]:
    """The example StreamQueue with its password from the Secret, calling the stand-in; ``redis_url``
    replaces the example's ``redis://redis:6379/0`` (None keeps it)."""
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    spec = manifest["spec"]
    spec["redis"] = {**spec["redis"], "passwordSecretRef": {"name": REDIS_SECRET, "key": "password"}}
    if redis_url is not None:
        spec["redis"]["url"] = redis_url
    spec["worker"] = {
        **spec["worker"],
        "handler": "streamqueue.handlers.http:handle",
        "handlerUrl": handler_url,
        **worker,
    }
    spec["scaling"] = {**spec["scaling"], **scaling}
    return manifest


def apply(plane: ControlPlane, manifest: dict[str, Any] | str) -> None:
    """``kubectl apply`` in the queue's namespace: an object, or YAML text (several documents)."""
    text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
    plane.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=text)


def get_queue_row(plane: ControlPlane) -> dict[str, str]:
    """`kubectl get sq` as a user reads it: the printer columns by header."""
    header, *rows = plane.kubectl("get", "sq", QUEUE, "-n", NAMESPACE).stdout.splitlines()
    return dict(zip(header.split(), rows[0].split(), strict=False))


# ---- the model server the HTTP handler calls ------------------------------------------------------------


class ModelStandIn:
    """Answers each POST after ``delay_s``, as a model server would: the reply names its user.
    ``arrivals`` records when each request came (``time.monotonic()``)."""

    def __init__(self, host: str, delay_s: float) -> None:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                stand_in.arrivals.append(time.monotonic())
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(stand_in.delay_s)
                reply = f"reply to {body['user_id']}: {body['message']}".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.delay_s = delay_s
        self.arrivals: list[float] = []
        self._server = ThreadingHTTPServer((host, free_port(host)), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, name="model-stand-in", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---- the worker pods, as the API shows them ---------------------------------------------------------------


@dataclass
class PodWatch:
    """Follows the queue's worker pods: which exist and are Ready, the most Ready at once, how each ended."""

    plane: ControlPlane
    alive: set[str] = field(default_factory=set)
    ready: set[str] = field(default_factory=set)
    max_ready: int = 0
    max_ready_at: float = 0.0  # time.monotonic() when max_ready was reached
    exit_codes: dict[str, int] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    deletion_costs: dict[str, str] = field(default_factory=dict)  # pod -> the operator's last cost
    error: Exception | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pod-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with self.plane.api_client() as api:
                core = kubernetes.client.CoreV1Api(api)
                while not self._stop.is_set():
                    # List, then watch from the list's version: a pod deleted between two watches
                    # sends no DELETED event to either, so each list also forgets the pods it lacks.
                    listing = core.list_namespaced_pod(NAMESPACE, label_selector=POD_SELECTOR)
                    self._forget_all_but({str(p.metadata.name) for p in listing.items if p.metadata})
                    for pod in listing.items:
                        self._record("MODIFIED", pod)
                    stream = kubernetes.watch.Watch().stream(
                        core.list_namespaced_pod, NAMESPACE, label_selector=POD_SELECTOR, timeout_seconds=2,
                        resource_version=listing.metadata.resource_version if listing.metadata else None,
                    )  # fmt: skip
                    for event in stream:
                        self._record(event["type"], event["object"])
        except Exception as exc:  # surfaced by wait(): a dead watch must not look like a slow cluster
            with self._changed:
                self.error = exc
                self._changed.notify_all()

    def _forget_all_but(self, names: set[str]) -> None:
        with self._changed:
            self.alive &= names
            self.ready &= names
            self._changed.notify_all()

    def _record(self, kind: str, pod: kubernetes.client.V1Pod) -> None:
        name = str(pod.metadata.name if pod.metadata else "")
        conditions = (pod.status.conditions if pod.status else None) or []
        is_ready = kind != "DELETED" and any(c.type == "Ready" and c.status == "True" for c in conditions)
        with self._changed:
            self.seen.add(name)
            annotations = (pod.metadata.annotations if pod.metadata else None) or {}
            if DELETION_COST in annotations:
                self.deletion_costs[name] = annotations[DELETION_COST]
            (self.alive.discard if kind == "DELETED" else self.alive.add)(name)
            (self.ready.add if is_ready else self.ready.discard)(name)
            if len(self.ready) > self.max_ready:
                self.max_ready, self.max_ready_at = len(self.ready), time.monotonic()
            for status in (pod.status.container_statuses if pod.status else None) or []:
                ended = status.state.terminated if status.state else None
                if ended is not None:
                    self.exit_codes[name] = ended.exit_code
            self._changed.notify_all()

    def wait(self, what: str, condition: Any, timeout_s: float) -> None:
        """Block until ``condition(self)`` holds, re-checked on every pod event."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.error or condition(self), timeout=timeout_s):
                raise TimeoutError(f"{what} not reached in {timeout_s:.0f}s (ready: {sorted(self.ready)})")
            if self.error is not None:
                raise RuntimeError(f"the pod watch failed while waiting for {what}") from self.error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# ---- messages --------------------------------------------------------------------------------------------


def send(client: redis.Redis, requests: Iterable[tuple[str, str, str]]) -> int:
    """XADD (user, request_id, text) triples the article's way plus a request_id, pipelined."""
    pipe = client.pipeline(transaction=False)
    count = 0
    for user, request_id, text in requests:
        pipe.xadd(
            STREAM, {"user_id": user, "message": text, "timestamp": time.time(), "request_id": request_id}
        )
        count += 1
    pipe.execute()
    return count


_Entries = list[tuple[str, dict[str, str]]]


def replies(client: redis.Redis, user: str) -> list[dict[str, str]]:
    """Every entry of ``user``'s reply stream (``client`` decodes responses)."""
    return [fields for _, fields in cast(_Entries, client.xrange(f"{REPLY_PREFIX}{user}"))]


def await_reply(client: redis.Redis, user: str, request_id: str, timeout_s: float) -> float:
    """Seconds until the reply to ``request_id`` is on ``user``'s stream (blocking reads, no polling)."""
    began = time.monotonic()
    last = "0"
    while time.monotonic() - began < timeout_s:
        streams = cast(list[tuple[str, _Entries]], client.xread({f"{REPLY_PREFIX}{user}": last}, block=500))
        for _, entries in streams or []:
            for entry_id, fields in entries:
                last = entry_id
                if fields.get("request_id") == request_id:
                    return time.monotonic() - began
    raise TimeoutError(f"no reply to {request_id} for {user} in {timeout_s:.0f}s")
