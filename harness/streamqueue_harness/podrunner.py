"""TEST HARNESS ONLY: a stand-in for the kubelet that runs one local process per worker Pod.

The local control plane has no kubelet and no container engine, yet scaling must be exercised end
to end: Deployment -> ReplicaSet -> Pods -> worker processes that join the Redis consumer group
under the Pod's name and drain on SIGTERM. ``WorkerPodRunner`` watches the Pods matching a label
selector in one namespace and, like a kubelet on a node it registers:

- binds unscheduled Pods to its node (there is no scheduler either);
- starts the Pod's first container as a local process (default ``python -m streamqueue.worker``)
  with the container's environment resolved like the kubelet does (``podenv``), the Pod's name as
  ``HOSTNAME`` and ``STREAMQUEUE_CONSUMER``, and a free loopback port as ``STREAMQUEUE_HEALTH_PORT``;
- reports the Pod Running, then Ready once the readiness probe's path answers on that port, and
  keeps probing (``periodSeconds``, ``failureThreshold``) so readiness follows the process and
  Deployment ``readyReplicas`` behaves as on a real cluster; a failing liveness probe restarts it;
- restarts a process that exits on its own (``restartPolicy: Always``), with back-off;
- on graceful deletion (``deletionTimestamp``) sends SIGTERM, waits up to the grace period, then
  SIGKILL, and deletes the Pod with grace 0 as the kubelet does.

It never runs container images, mounts volumes or enforces resources: it is not a kubelet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import kubernetes.client
import kubernetes.config
import urllib3
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines
from redis.backoff import ExponentialBackoff

from .podenv import EnvResolutionError, Sources, container_env
from .ports import free_port
from .processes import spawn, stop_groups
from .workerproc import WORKER_COMMAND

log = logging.getLogger(__name__)

DEFAULT_NODE = "streamqueue-harness-node"
DEFAULT_GRACE_SECONDS = 30
WATCH_SECONDS = 5
PROBE_INTERVAL = 0.2
RESTART_BACKOFF_MAX = 10.0
_RESTART_BACKOFF = ExponentialBackoff(cap=RESTART_BACKOFF_MAX, base=1.0)  # 1, 2, 4, 8, 10, ... seconds
ENV_RETRY_SECONDS = 2.0
LOOPBACK = "127.0.0.1"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _grace_seconds(pod: Mapping[str, Any]) -> float:
    """The grace the API gave this deletion, else the Pod's own, else Kubernetes' default."""
    grace = pod["metadata"].get("deletionGracePeriodSeconds")
    if grace is None:
        grace = pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
    return float(grace)


@dataclass(frozen=True)
class _HttpProbe:
    """A container's HTTP readiness or liveness probe, as far as the runner honours it."""

    path: str | None  # None: no HTTP probe (always passes)
    period: float
    failure_threshold: int

    @classmethod
    def of(cls, container: Mapping[str, Any], kind: str) -> _HttpProbe:
        probe = container.get(kind) or {}
        http = probe.get("httpGet")
        path = str(http.get("path") or "/") if http else None
        return cls(path, float(probe.get("periodSeconds", 10)), int(probe.get("failureThreshold", 3)))

    def url(self, port: int) -> str | None:
        return None if self.path is None else f"http://{LOOPBACK}:{port}{self.path}"


class _ProbeRun:
    """One probe of one running process: failing after ``failure_threshold`` failures in a row."""

    def __init__(self, probe: _HttpProbe, port: int) -> None:
        self.probe = probe
        self.url = probe.url(port)
        self.failures = 0
        self.next_due = time.monotonic() + probe.period

    def failing(self) -> bool | None:
        """None when no check is due; otherwise probe now and say whether the threshold is reached."""
        if self.url is None or time.monotonic() < self.next_due:
            return None
        self.next_due = time.monotonic() + self.probe.period
        self.failures = 0 if _answers(self.url) else self.failures + 1
        return self.failures >= self.probe.failure_threshold


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return 200 <= int(response.status) < 400
    except (urllib.error.URLError, OSError):
        return False


class WorkerPodRunner:
    """TEST HARNESS: runs a local process for each Pod matching ``selector`` in ``namespace``.

    See the module docstring for what it does and does not do. Use it as a context manager, or call
    ``start()``/``stop()``; ``stop()`` stops every process (SIGTERM, SIGKILL after ``stop_grace``)
    and leaves the Pods in the API as they are, like a node that went away.
    """

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        selector: str,
        command: list[str] | None = None,
        env_overrides: dict[str, str] | None = None,
        *,
        node_name: str = DEFAULT_NODE,
        log_dir: Path | None = None,
        stop_grace: float = 10.0,
    ) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.namespace = namespace
        self.selector = selector
        self.command = list(command) if command is not None else list(WORKER_COMMAND)
        self.env_overrides = dict(env_overrides or {})
        self.node_name = node_name
        self.log_dir = (
            Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="sq-podrunner-"))
        )
        self.stop_grace = stop_grace
        self._pods: dict[str, _PodProcess] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self._watch_response: urllib3.HTTPResponse | None = None
        self._api: kubernetes.client.ApiClient | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> WorkerPodRunner:
        self._api = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        self._register_node()
        self._stopping.clear()
        self._watch_thread = threading.Thread(target=self._watch_loop, name="podrunner-watch", daemon=True)
        self._watch_thread.start()
        log.info(
            "worker-pod runner (test harness) watching %s pods %r on node %s",
            self.namespace,
            self.selector,
            self.node_name,
        )
        return self

    def stop(self) -> None:
        self._stopping.set()
        response = self._watch_response
        if response is not None:  # unblock the watch thread's read now rather than at the watch timeout
            # The watch may have ended (and closed its socket) a moment ago: then there is nothing to unblock.
            with contextlib.suppress(OSError):
                response.shutdown()
        if self._watch_thread is not None:
            self._watch_thread.join(timeout=WATCH_SECONDS + 5)
            self._watch_thread = None
        with self._lock:
            pods = list(self._pods.values())
        for pod in pods:
            pod.terminate(min(pod.grace, self.stop_grace), delete_pod=False)
        for pod in pods:
            pod.join()
        if self._api is not None:
            self._api.close()
            self._api = None

    def __enter__(self) -> WorkerPodRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def running(self) -> dict[str, int]:
        """Pod name -> pid of its process, for the Pods whose process is alive right now."""
        with self._lock:
            pods = list(self._pods.values())
        return {p.name: pid for p in pods if (pid := p.pid) is not None}

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        assert self._api is not None, "the worker-pod runner is not started"
        return kubernetes.client.CoreV1Api(self._api)

    # ---- node ------------------------------------------------------------------------------------------

    def _register_node(self) -> None:
        """The Node the Pods are bound to: graceful deletion only applies to Pods bound to a node."""
        labels = {"kubernetes.io/hostname": self.node_name}
        node = kubernetes.client.V1Node(
            metadata=kubernetes.client.V1ObjectMeta(name=self.node_name, labels=labels)
        )
        try:
            self.core.create_node(node)
        except ApiException as exc:
            if exc.status != 409:
                raise
        now = _now()
        ready = {
            "type": "Ready", "status": "True", "reason": "WorkerPodRunner",
            "message": "test harness: runs worker Pods as local processes",
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        }  # fmt: skip
        capacity = {"pods": "110", "cpu": str(os.cpu_count() or 1), "memory": "8Gi"}
        status = {
            "conditions": [ready], "addresses": [{"type": "InternalIP", "address": LOOPBACK}],
            "capacity": capacity, "allocatable": capacity,
        }  # fmt: skip
        self.core.patch_node_status(self.node_name, {"status": status})

    # ---- watch -----------------------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._watch(self._list_and_sync())
            except ApiException as exc:
                if exc.status != 410:  # 410: our resourceVersion is too old; a fresh list fixes it
                    log.warning("worker-pod runner: watch failed (%s); relisting", exc.reason)
                    self._stopping.wait(1)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                if not self._stopping.is_set():
                    log.warning("worker-pod runner: watch connection failed (%s); relisting", exc)
                    self._stopping.wait(1)

    def _list_and_sync(self) -> str:
        listing = json.loads(self._pods_request().data)
        present = set()
        for pod in listing["items"]:
            present.add(pod["metadata"]["uid"])
            self._observe(pod)
        with self._lock:
            vanished = [p for p in self._pods.values() if p.uid not in present]
        for pod in vanished:
            pod.terminate(pod.grace, delete_pod=False)
        return str(listing["metadata"]["resourceVersion"])

    def _watch(self, resource_version: str) -> None:
        while not self._stopping.is_set():
            response = self._pods_request(
                watch=True, resource_version=resource_version, allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
            )  # fmt: skip
            self._watch_response = response
            try:
                for line in iter_resp_lines(response):
                    resource_version = self._on_event(json.loads(line)) or resource_version
            finally:
                self._watch_response = None
                response.release_conn()

    def _pods_request(self, **query: Any) -> urllib3.HTTPResponse:
        """List or watch the Pods as raw JSON: the runner works on manifests, like ``podenv``."""
        response = self.core.list_namespaced_pod(
            self.namespace, label_selector=self.selector, _preload_content=False, **query
        )
        return cast(urllib3.HTTPResponse, response)

    def _on_event(self, event: dict[str, Any]) -> str | None:
        kind, obj = event["type"], event["object"]
        if kind == "ERROR":
            raise ApiException(status=obj.get("code"), reason=obj.get("message"))
        if kind == "DELETED":
            self._gone(obj)
        elif kind in ("ADDED", "MODIFIED"):
            self._observe(obj)
        return str(obj["metadata"].get("resourceVersion") or "") or None

    # ---- what a kubelet does with a Pod ----------------------------------------------------------------

    def _observe(self, pod: dict[str, Any]) -> None:
        metadata, spec = pod["metadata"], pod["spec"]
        deleting = metadata.get("deletionTimestamp") is not None
        node = spec.get("nodeName")
        if not node:
            if not deleting:
                self._bind(metadata["name"])
            return
        if node != self.node_name:
            return
        with self._lock:
            process = self._pods.get(metadata["name"])
            if process is not None and process.uid != metadata["uid"]:
                process.terminate(process.grace, delete_pod=False)  # an older Pod of the same name
                process = None
            if (
                process is None
                and not deleting
                and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed")
            ):
                process = _PodProcess(self, pod)
                self._pods[process.name] = process
                process.start()
        if deleting:
            if process is None:
                self.delete_pod_now(metadata["name"], metadata["uid"])
            else:
                process.terminate(_grace_seconds(pod), delete_pod=True)

    def _gone(self, pod: dict[str, Any]) -> None:
        """The Pod was removed without us (force deletion): stop its process."""
        with self._lock:
            process = self._pods.get(pod["metadata"]["name"])
        if process is not None and process.uid == pod["metadata"]["uid"]:
            process.terminate(_grace_seconds(pod), delete_pod=False)

    def _bind(self, name: str) -> None:
        binding = kubernetes.client.V1Binding(
            metadata=kubernetes.client.V1ObjectMeta(name=name),
            target=kubernetes.client.V1ObjectReference(api_version="v1", kind="Node", name=self.node_name),
        )
        try:
            self.core.create_namespaced_pod_binding(name, self.namespace, binding, _preload_content=False)
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone, or bound meanwhile
                raise

    def delete_pod_now(self, name: str, uid: str) -> None:
        """What the kubelet does once a terminating Pod's containers are stopped."""
        options = kubernetes.client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=kubernetes.client.V1Preconditions(uid=uid)
        )
        try:
            self.core.delete_namespaced_pod(name, self.namespace, body=options)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def forget(self, process: _PodProcess) -> None:
        with self._lock:
            if self._pods.get(process.name) is process:
                del self._pods[process.name]

    def sources(self) -> Sources:
        """Secrets and ConfigMaps of the runner's namespace, for env resolution."""

        def secret(name: str) -> Mapping[str, str] | None:
            return self._read(lambda: self.core.read_namespaced_secret(name, self.namespace).data or {})

        def config_map(name: str) -> Mapping[str, str] | None:
            return self._read(lambda: self.core.read_namespaced_config_map(name, self.namespace).data or {})

        return Sources(secret=secret, config_map=config_map)

    @staticmethod
    def _read(read: Callable[[], Mapping[str, Any]]) -> Mapping[str, str] | None:
        try:  # JSON carries Secret data as base64 strings, whatever the client's type hint allows
            return cast(Mapping[str, str], dict(read()))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def process_env(
        self, pod: Mapping[str, Any], container: Mapping[str, Any], health_port: int
    ) -> dict[str, str]:
        """This machine's environment without inherited ``STREAMQUEUE_*``, then the Pod's, then ours."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMQUEUE_")}
        env.update(container_env(pod, container, self.sources()))
        name = pod["metadata"]["name"]
        env.update(
            {"HOSTNAME": name, "STREAMQUEUE_CONSUMER": name, "STREAMQUEUE_HEALTH_PORT": str(health_port)}
        )
        env.update(self.env_overrides)
        return env


class _PodProcess(threading.Thread):
    """One Pod's process and its lifecycle, in its own thread (like the kubelet's pod workers).

    The thread starts the process, so it is also the thread whose death would kill it
    (``processes.spawn``); it lives until the process is stopped.
    """

    def __init__(self, runner: WorkerPodRunner, pod: dict[str, Any]) -> None:
        super().__init__(name=f"pod-{pod['metadata']['name']}", daemon=True)
        self.runner = runner
        self.pod = pod
        self.name: str = pod["metadata"]["name"]
        self.uid: str = pod["metadata"]["uid"]
        self.container: dict[str, Any] = pod["spec"]["containers"][0]
        self.readiness = _HttpProbe.of(self.container, "readinessProbe")
        self.liveness = _HttpProbe.of(self.container, "livenessProbe")
        self.grace = float(pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS))
        self.restarts = 0
        self._delete_pod = False
        self._terminating = threading.Event()
        self._popen: Any = None
        self._started_at = _now()

    @property
    def pid(self) -> int | None:
        popen = self._popen
        return popen.pid if popen is not None and popen.poll() is None else None

    def terminate(self, grace: float, *, delete_pod: bool) -> None:
        self.grace = grace
        self._delete_pod = self._delete_pod or delete_pod
        self._terminating.set()

    def run(self) -> None:
        try:
            self._supervise()
        except Exception:
            log.exception("worker-pod runner: pod %s failed", self.name)
        finally:
            self._stop_process()
            if self._delete_pod:
                self._best_effort(lambda: self.runner.delete_pod_now(self.name, self.uid))
            self.runner.forget(self)

    def _supervise(self) -> None:
        crashes = 0  # since the last time the process became ready: the kubelet's CrashLoopBackOff
        while not self._terminating.is_set():
            port = free_port()
            try:
                env = self.runner.process_env(self.pod, self.container, port)
            except EnvResolutionError as exc:
                self._report(waiting=("CreateContainerConfigError", str(exc)))
                self._terminating.wait(ENV_RETRY_SECONDS)
                continue
            self._launch(env)
            self._report(running=True, ready=False)
            if self._await_ready(self.readiness.url(port)):
                self._report(running=True, ready=True)
                crashes = 0
                self._probe_until_exit(port)
            if self._terminating.is_set():
                return
            self.restarts += 1
            backoff = _RESTART_BACKOFF.compute(crashes)
            crashes += 1
            log.warning(
                "worker-pod runner: %s exited with %s; restarting in %.0fs",
                self.name,
                self._popen.returncode,
                backoff,
            )
            self._report(waiting=("CrashLoopBackOff", f"exited with {self._popen.returncode}"))
            self._terminating.wait(backoff)

    def _launch(self, env: dict[str, str]) -> None:
        log_path = self.runner.log_dir / f"{self.name}.log"
        self._popen = spawn(self.runner.command, log=log_path, env=env)
        self._started_at = _now()
        log.info("worker-pod runner: started %s as pid %d (log %s)", self.name, self._popen.pid, log_path)

    def _await_ready(self, url: str | None) -> bool:
        while self._popen.poll() is None and not self._terminating.is_set():
            if url is None or _answers(url):
                return True
            self._terminating.wait(PROBE_INTERVAL)
        return False

    def _probe_until_exit(self, port: int) -> None:
        """Probe a ready process until it exits or is stopped, like the kubelet's probe workers.

        Readiness changes are reported; a failed liveness probe stops the process (SIGTERM, grace,
        SIGKILL) so the supervisor restarts it.
        """
        readiness, liveness = _ProbeRun(self.readiness, port), _ProbeRun(self.liveness, port)
        ready = True
        while self._popen.poll() is None and not self._terminating.wait(PROBE_INTERVAL):
            if liveness.failing():
                log.warning("worker-pod runner: %s failed its liveness probe; restarting it", self.name)
                self._stop_process()
                return
            failing = readiness.failing()
            if failing is not None and ready == failing:
                ready = not failing
                self._report(running=True, ready=ready)

    def _stop_process(self) -> None:
        popen = self._popen
        if popen is not None and popen.poll() is None:
            log.info("worker-pod runner: stopping %s (pid %d, grace %.0fs)", self.name, popen.pid, self.grace)
            stop_groups([(popen.pid, popen)], self.grace)

    def _report(
        self, *, running: bool = False, ready: bool = False, waiting: tuple[str, str] | None = None
    ) -> None:
        status = self._status(running, ready, waiting)
        namespace = self.runner.namespace
        self._best_effort(lambda: self.runner.core.patch_namespaced_pod_status(self.name, namespace, status))

    def _status(self, running: bool, ready: bool, waiting: tuple[str, str] | None) -> dict[str, Any]:
        now = _now()
        flag = "True" if ready else "False"
        state: dict[str, Any] = (
            {"running": {"startedAt": self._started_at}}
            if running
            else {"waiting": {"reason": waiting[0], "message": waiting[1]} if waiting else {}}
        )
        conditions = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
            {"type": "Ready", "status": flag, "lastTransitionTime": now},
        ]
        container = {
            "name": self.container["name"], "image": self.container.get("image", ""), "imageID": "",
            "containerID": f"harness://{self._popen.pid}" if running and self._popen else None,
            "ready": ready, "started": running, "restartCount": self.restarts, "state": state,
        }  # fmt: skip
        return {
            "status": {
                "phase": "Running" if running else "Pending", "conditions": conditions,
                "containerStatuses": [container], "hostIP": LOOPBACK, "podIP": LOOPBACK,
                "podIPs": [{"ip": LOOPBACK}], "startTime": self.pod.get("status", {}).get("startTime") or now,
            }
        }  # fmt: skip

    def _best_effort(self, call: Callable[[], object]) -> None:
        """API writes from a pod thread must not kill it: the process still has to be stopped."""
        try:
            call()
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("worker-pod runner: API call for %s failed: %s", self.name, exc)
