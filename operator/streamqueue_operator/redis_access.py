"""The operator's Redis client for one queue: credentials resolved from Secrets, short timeouts.

A short socket timeout keeps one poll bounded: an unreachable Redis shows up as an error
Observation within seconds (and replicas are held) instead of stalling the queue's poll loop.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio
from pydantic import SecretStr
from streamqueue.connection import RedisConnectionSettings
from streamqueue.connection import connect as shared_connect

from .act import Cluster
from .models import RedisSpec

SOCKET_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class Credentials:
    password: str | None
    ca_pem: str | None


async def resolve(cluster: Cluster, namespace: str, spec: RedisSpec) -> Credentials:
    """Read the password and CA bundle the spec refers to (LookupError names what is missing)."""
    password = ca = None
    if spec.password_secret_ref:
        password = await cluster.secret_value(namespace, spec.password_secret_ref)
    if spec.tls.ca_secret_ref:
        ca = await cluster.secret_value(namespace, spec.tls.ca_secret_ref)
    return Credentials(password, ca)


def connect(spec: RedisSpec, credentials: Credentials, ca_dir: Path) -> redis.asyncio.Redis:
    """A client through the shared ``streamqueue.connection`` rules, with the operator's short timeout.

    The CA bundle is written under ``ca_dir`` (the operator's writable /tmp) because the shared
    connection settings take a CA file, as the worker does with its mounted Secret.
    """
    ca_file = None
    if credentials.ca_pem:
        ca_dir.mkdir(parents=True, exist_ok=True)
        ca_file = ca_dir / f"ca-{hashlib.sha256(credentials.ca_pem.encode()).hexdigest()[:16]}.pem"
        ca_file.write_text(credentials.ca_pem)
    settings = RedisConnectionSettings(
        redis_url=spec.url,
        redis_username=spec.username,
        redis_password=SecretStr(credentials.password) if credentials.password is not None else None,
        redis_tls=spec.tls_on,
        redis_tls_ca_file=ca_file,
        redis_socket_timeout=SOCKET_TIMEOUT_SECONDS,
    )
    return shared_connect(settings)
