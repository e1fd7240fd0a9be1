"""The operator's Redis client for one queue: credentials resolved from Secrets, short timeouts.

A short socket timeout keeps one poll bounded: an unreachable Redis shows up as an error
Observation within seconds (and replicas are held) instead of stalling the queue's poll loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import SecretStr
from streamqueue.connection import RedisClient, RedisConnection, connect_any

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


def connect(spec: RedisSpec, credentials: Credentials) -> RedisClient:
    """A client through the shared ``streamqueue.connection`` rules, with the operator's short timeout.

    The CA bundle goes to redis-py as data, so the operator writes no file.
    """
    connection = RedisConnection(
        url=spec.url,
        username=spec.username,
        password=SecretStr(credentials.password) if credentials.password is not None else None,
        tls=spec.tls_on,
        tls_ca_data=credentials.ca_pem,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        cluster=spec.cluster,
    )
    return connect_any(connection)
