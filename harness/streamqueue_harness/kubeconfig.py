"""Kubeconfig files for the local control plane.

Credentials are embedded (``*-data``) rather than referenced by path, so a kubeconfig keeps working
when copied elsewhere and kubectl, helm, kopf and the Python client all read it the same way.
"""

from __future__ import annotations

import base64
from pathlib import Path

import yaml

CLUSTER = "streamqueue-local"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca_cert: Path,
    user: str,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> Path:
    """Write a single-context kubeconfig that authenticates with a client certificate or a token."""
    if (client_cert is None) == (token is None):
        raise ValueError("give either a client certificate (with its key) or a token")
    credentials: dict[str, str] = {}
    if client_cert is not None:
        if client_key is None:
            raise ValueError("a client certificate needs its key")
        credentials = {"client-certificate-data": _b64(client_cert), "client-key-data": _b64(client_key)}
    else:
        credentials = {"token": str(token)}
    context: dict[str, str] = {"cluster": CLUSTER, "user": user}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": CLUSTER, "cluster": {"server": server, "certificate-authority-data": _b64(ca_cert)}}
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": context}],
        "current-context": user,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
