"""The operator's Redis client for one queue: credentials resolved from Secrets, short timeouts.

Short socket timeouts and no client-side retries keep one poll bounded: an unreachable Redis shows
up as an error Observation within a couple of seconds (and replicas are held) instead of stalling
the poll loop behind redis-py's reconnect backoff.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

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


def connect(spec: RedisSpec, credentials: Credentials) -> redis.asyncio.Redis:
    options: dict[str, object] = {
        "username": spec.username,
        "password": credentials.password,
        "socket_timeout": SOCKET_TIMEOUT_SECONDS,
        "socket_connect_timeout": SOCKET_TIMEOUT_SECONDS,
        "retry": Retry(NoBackoff(), 0),
        "client_name": "streamqueue-operator",
    }
    url = spec.url
    if spec.tls_on:
        url = url.replace("redis://", "rediss://", 1)
        if credentials.ca_pem:
            options["ssl_ca_data"] = credentials.ca_pem
    return redis.asyncio.Redis.from_url(url, **options)  # type: ignore[arg-type]
