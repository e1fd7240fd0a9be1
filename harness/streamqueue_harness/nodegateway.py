"""The gateway on the real node, installed as users install it: the chart with ``gateway.enabled``.

Shared by the node's gateway tests (the openai SDK, the browser). The chart release of ``nodequeue``
gets the gateway (``helm upgrade --install --reuse-values``, so an operator another test installed
stays as it is); the API keys and the Redis password reach it as Secrets in the release's namespace,
only the keys' hashes stored. A StreamQueue of its own, whose worker runs the model handler against
a model server the test starts on the node's IP, answers what the gateway queues. The test process
reaches the gateway at its Service's ClusterIP, as it reaches Redis (``nodequeue.deploy_redis``).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import yaml
from streamqueue_gateway.auth import hash_key

from . import nodequeue as q
from .controlplane import ControlPlane
from .helm import CHART, helm

log = logging.getLogger(__name__)

QUEUE = "gwchat"
STREAM = "gateway_queue"
MODEL = "tiny"  # the name clients ask for; the worker asks the model server for its own alias
KEYS_SECRET = "gateway-api-keys"
SERVICE = f"{q.RELEASE}-streamqueue-operator-gateway"
# pro: no limits; trial: one token a minute, so the first reply puts the user in debt and the next
# request is refused (429) for the many minutes that reply's tokens take to pay back.
TIERS = {
    "pro": {"maxRequests": 0, "tokensPerMinute": 0, "tierMaxRequests": 0, "tierTokensPerMinute": 0},
    "trial": {"maxRequests": 0, "tokensPerMinute": 1, "tierMaxRequests": 0, "tierTokensPerMinute": 0},
}
USERS = {"alice-gw": "pro", "bob-gw": "trial"}


@dataclass(frozen=True)
class NodeGateway:
    """What a client needs: the OpenAI base URL, each user's API key, the model's name."""

    base_url: str  # http://<ClusterIP>:<port>/v1
    keys: dict[str, str]  # user -> API key
    model: str = MODEL


def gateway_values(redis_url: str, tiers: dict[str, Any]) -> dict[str, Any]:
    """The chart values: one replica (the HPA allows two: the chart's HPA and PDB are rendered), the
    Secrets by name, the queue as the model ``MODEL``."""
    return {
        "gateway": {
            "enabled": True,
            "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 2},
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
            "secrets": {
                "apiKeys": {"name": KEYS_SECRET, "key": "keys.json"},
                "redisPassword": {"name": q.REDIS_SECRET, "key": "password"},
            },
            "config": {
                "redis": {"url": redis_url},
                "models": [{"name": MODEL, "stream": STREAM, "maxBacklog": 100}],
                "auth": {"defaultTier": "pro"},
                "tiers": tiers,
            },
        }
    }


def create_secrets(plane: ControlPlane, redis_password: str, users: dict[str, str]) -> dict[str, str]:
    """The Redis password and the API keys file (hashes only) in the release's namespace; returns the keys."""
    namespace = q.OPERATOR_NAMESPACE
    plane.kubectl("create", "namespace", namespace, check=False)  # there already when the operator is
    keys = {user: f"sk-{secrets.token_hex(16)}" for user in users}
    entries = [{"sha256": hash_key(keys[user]), "user": user, "tier": tier} for user, tier in users.items()]
    for name, key, value in (
        (q.REDIS_SECRET, "password", redis_password),
        (KEYS_SECRET, "keys.json", json.dumps(entries)),
    ):
        manifest = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "data": {key: base64.b64encode(value.encode()).decode()},
        }
        plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    return keys


def install_gateway(plane: ControlPlane, values: dict[str, Any], timeout_s: int = 180) -> None:
    """``helm upgrade --install`` of the release with ``values`` on top, until the gateway is Ready."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(values, file)
        file.flush()
        helm(
            "upgrade", "--install", q.RELEASE, str(CHART), "-n", q.OPERATOR_NAMESPACE, "--create-namespace",
            "--reuse-values", "-f", file.name, "--wait", f"--timeout={timeout_s}s",
            kubeconfig=plane.kubeconfig, timeout=timeout_s + 60,
        )  # fmt: skip


def model_queue(model_base_url: str) -> dict[str, Any]:
    """The StreamQueue the gateway's model names: one always-on worker running the model handler."""
    queue = q.example_queue(None, model_base_url, {}, {"minReplicas": 1, "maxReplicas": 1})
    worker = queue["spec"]["worker"]
    del worker["handlerUrl"]
    worker.update(
        handler="streamqueue.handlers.openai:handle",
        openaiBaseUrl=model_base_url,
        openaiModel="tiny",
        openaiMaxTokens=8,
        chunkFlushMs=0,  # an entry per token: the stream shows every chunk
    )
    queue["metadata"]["name"] = QUEUE
    queue["spec"]["stream"] = STREAM
    return queue


def deploy(plane: ControlPlane, redis_image: str, model_base_url: str) -> NodeGateway:
    """Redis (shared with the other node tests), the model's queue and the gateway in front of it."""
    began = time.monotonic()
    q.ensure_redis(plane, redis_image).close()
    keys = create_secrets(plane, q.redis_password(plane), USERS)
    install_gateway(plane, gateway_values(f"redis://redis.{q.NAMESPACE}.svc:6379/0", TIERS))
    q.apply(plane, model_queue(model_base_url))  # the chart brings the CRD
    worker = f"deployment/{QUEUE}-worker"  # the operator creates it
    plane.kubectl("wait", "--for=create", worker, "-n", q.NAMESPACE, "--timeout=120s", timeout=180)
    plane.kubectl("rollout", "status", worker, "-n", q.NAMESPACE, "--timeout=180s", timeout=240)
    address = "jsonpath={.spec.clusterIP}:{.spec.ports[0].port}"
    service = plane.kubectl("get", "service", SERVICE, "-n", q.OPERATOR_NAMESPACE, "-o", address).stdout
    log.info("gateway and its queue's worker Ready in %.1fs", time.monotonic() - began)
    return NodeGateway(base_url=f"http://{service}/v1", keys=keys)
