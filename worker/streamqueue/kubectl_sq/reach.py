"""How ``kubectl sq`` reaches a queue's Redis: the sqtool commands in a short-lived pod inside the
cluster (the default), or in this process (``--direct``).

The pod is the worker Deployment's pod template cut down: the same image, environment (Secrets
included, as references), volumes, service account and security settings, so it reaches Redis
exactly as the workers do; ``python -m streamqueue.sqtool`` instead of the worker, no probes or
ports, no labels (a ReplicaSet must not adopt it), ``restartPolicy: Never``; its answer is read from
its log once it has finished, then it is deleted.

A least-privilege worker user lacks what the tool issues (``streamqueue.acl``): a Secret with the
tool's own user (``--redis-secret``, or the StreamQueue's annotation ``streamqueue.io/tool-redis-secret``)
replaces the worker's Redis user and password in either way of reaching Redis.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from ..settings import env_name, from_environ
from ..sqtool.__main__ import run as run_sqtool
from ..sqtool.args import parser as sqtool_parser
from .kube import TOOL_REDIS_SECRET, Kubectl, Queue

SQTOOL = ["python", "-m", "streamqueue.sqtool"]
RedisSide = Callable[[Queue, list[str]], dict[str, Any]]


class SqtoolError(RuntimeError):
    """The Redis side answered with an error (or not at all)."""


# The tool user's Secret: the keys of a kubernetes.io/basic-auth Secret, as the variables they set.
CREDENTIALS = {env_name("redis_username"): "username", env_name("redis_password"): "password"}


def tool_secret(queue: Queue, flag: str | None) -> str | None:
    """The Secret with the tool's Redis user: ``--redis-secret``, else the StreamQueue's annotation."""
    return flag or queue.annotations.get(TOOL_REDIS_SECRET) or None


def tool_container(queue: Queue, secret: str | None) -> dict[str, Any]:
    """The worker container, with the Redis user and password from ``secret`` instead of the worker's
    (a password file, which would conflict with the password, is dropped too) when one is named."""
    container = queue.worker_container()
    if not secret:
        return container
    replaced = {*CREDENTIALS, env_name("redis_password_file")}
    env = [var for var in container.get("env") or [] if var["name"] not in replaced]
    for name, key in CREDENTIALS.items():
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    return container | {"env": env}


def direct(kubectl: Kubectl, redis_url: str | None, secret: str | None) -> RedisSide:
    """Run the commands here, with the worker's environment resolved from the Deployment (Secrets read
    through kubectl; the tool user's ``secret`` too) and ``redis_url`` instead of the queue's own when
    given (e.g. a port-forward)."""

    def call(queue: Queue, argv: list[str]) -> dict[str, Any]:
        env = worker_environment(kubectl, tool_container(queue, secret))
        if redis_url:
            env[env_name("redis_url")] = redis_url
        try:
            return asyncio.run(run_sqtool(from_environ(env), sqtool_parser().parse_args(argv)))
        except (RedisError, LookupError, ValueError) as exc:
            raise SqtoolError(f"{type(exc).__name__}: {exc}") from exc

    return call


def worker_environment(kubectl: Kubectl, container: dict[str, Any]) -> dict[str, str]:
    """The container's variables with values: plain ones, and Secret or ConfigMap keys read now.
    Downward-API ones (the pod name) have no value outside a pod and are left out."""
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var.get("valueFrom") or {}
        for kind, ref in (
            ("secret", source.get("secretKeyRef")),
            ("configmap", source.get("configMapKeyRef")),
        ):
            if ref:
                data = kubectl.get(kind, ref["name"]).get("data") or {}
                if ref["key"] in data:
                    value = data[ref["key"]]
                    env[var["name"]] = base64.b64decode(value).decode() if kind == "secret" else value
    return env


def in_pod(kubectl: Kubectl, timeout: float, secret: str | None) -> RedisSide:
    """Run the commands in a pod from the queue's worker image, then read its log.

    Not ``kubectl run --rm -i``: a tool that answers in a second can finish before kubectl attaches,
    and its one JSON line is lost (seen on a busy node). A finished pod's log is always there."""

    def call(queue: Queue, argv: list[str]) -> dict[str, Any]:
        name = f"{queue.name}-sq-{secrets.token_hex(3)}"[-63:].lstrip("-")
        container = queue.worker_container()
        overrides = {"apiVersion": "v1", "spec": tool_pod_spec(queue, name, argv, secret)}
        kubectl.run(
            "run", name, "--restart=Never", f"--image={container['image']}",
            f"--overrides={json.dumps(overrides)}",
        )  # fmt: skip
        try:
            phase = _wait_finished(kubectl, name, timeout)
            out = kubectl.run("logs", f"pod/{name}")
        finally:
            kubectl.run("delete", "pod", name, "--ignore-not-found", "--wait=false")
        if phase not in POD_DONE:
            raise SqtoolError(f"the sqtool pod {name} did not finish within {timeout:.0f}s (phase {phase})")
        return parse_output(out)

    return call


POD_DONE = ("Succeeded", "Failed")  # Failed: the tool exited 1 with its JSON error in the log
_POD_POLL_S = 0.5


def _wait_finished(kubectl: Kubectl, pod: str, timeout: float) -> str:
    """The pod's phase once it has finished, or the last phase seen when ``timeout`` ran out."""
    deadline, phase = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        phase = kubectl.run("get", "pod", pod, "-o", "jsonpath={.status.phase}").strip()
        if phase in POD_DONE:
            break
        time.sleep(_POD_POLL_S)
    return phase


def tool_pod_spec(queue: Queue, name: str, argv: list[str], secret: str | None) -> dict[str, Any]:
    template = queue.deployment["spec"]["template"]["spec"] if queue.deployment else {}
    worker = tool_container(queue, secret)
    keep = ("image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext")
    container = {k: worker[k] for k in keep if k in worker}
    container |= {
        "name": name, "command": SQTOOL, "args": argv,
        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
    }  # fmt: skip
    spec = {
        k: v
        for k, v in template.items()
        if k not in ("containers", "initContainers", "terminationGracePeriodSeconds")
    }
    return spec | {"containers": [container], "restartPolicy": "Never", "terminationGracePeriodSeconds": 1}


def parse_output(out: str) -> dict[str, Any]:
    """The tool's one JSON line among whatever kubectl printed around it."""
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                result: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            if "error" in result:
                raise SqtoolError(result["error"])
            return result
    raise SqtoolError(f"no answer from the sqtool pod: {out.strip()[-2000:]}")
