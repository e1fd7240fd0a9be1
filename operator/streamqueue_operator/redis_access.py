"""The operator's Redis client for one queue: the spec's connection, seen from the operator's namespace.

``spec_connection`` is the one mapping of a StreamQueue's ``spec.redis`` onto the shared
``RedisConnection``: the operator dials it (with the Secrets' values), and the worker Deployment
carries it as ``STREAMQUEUE_REDIS_*`` variables (the password as a Secret reference, the CA as a
mounted file).

The workers run in the queue's namespace, the operator does not: a single-label host such as the
default ``redis`` names the Service ``redis`` of the queue's namespace for the workers, and nothing
(or something else) for the operator. ``operator_url`` therefore qualifies such a host as
``<host>.<namespace>.svc`` for the operator's own connection only; the workers keep the URL as
written. With TLS the operator verifies the certificate against the name it dials, the qualified one.

A short socket timeout keeps one poll bounded: an unreachable Redis shows up as an error
Observation within seconds (and replicas are held) instead of stalling the queue's poll loop.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr
from streamqueue.connection import RedisClient, RedisConnection, connect_any

from .models import RedisSpec

if TYPE_CHECKING:
    from .kubeapi import Cluster

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


def spec_connection(
    spec: RedisSpec,
    *,
    password: str | None = None,
    tls_ca_file: Path | None = None,
    tls_ca_data: str | None = None,
) -> RedisConnection:
    """The connection ``spec`` describes, with the URL as written (the workers' view of it)."""
    return RedisConnection(
        url=spec.url,
        username=spec.username,
        password=SecretStr(password) if password is not None else None,
        tls=spec.tls_on,
        tls_ca_file=tls_ca_file,
        tls_ca_data=tls_ca_data,
        cluster=spec.cluster,
    )


def qualified_host(host: str, namespace: str) -> str:
    """``host`` as the operator must dial it to reach what a pod of ``namespace`` reaches.

    Only a single-label DNS name changes (``redis`` -> ``redis.<namespace>.svc``): an IP address,
    ``localhost`` and a name with a dot (``redis.other``, ``redis.example.com``) mean the same from
    every namespace, or are the user's explicit choice. ``.svc`` rather than ``.svc.cluster.local``
    leaves the cluster domain to the pod's resolver, which knows it.
    """
    if not host or "." in host or host.lower() == "localhost" or _is_ip(host):
        return host
    return f"{host}.{namespace}.svc"


def operator_url(url: str, namespace: str) -> str:
    """``url`` with its host qualified for the queue's ``namespace``; user, port, path and query kept."""
    parts = urlsplit(url)
    host = parts.hostname
    if host is None:
        return url
    qualified = qualified_host(host, namespace)
    if qualified == host:
        return url
    userinfo, _, _ = parts.netloc.rpartition("@")
    netloc = qualified if parts.port is None else f"{qualified}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc}" if userinfo else netloc))


def dialled(spec: RedisSpec, credentials: Credentials, namespace: str) -> RedisConnection:
    """The connection the operator dials for a queue of ``namespace``, with its short timeout.

    The host is qualified with the queue's ``namespace`` (``operator_url``); for a Redis Cluster that
    is the seed node, the others are dialled at the addresses the cluster announces. The CA bundle
    goes to redis-py as data, so the operator writes no file.
    """
    connection = spec_connection(spec, password=credentials.password, tls_ca_data=credentials.ca_pem)
    return connection.model_copy(
        update={"url": operator_url(spec.url, namespace), "socket_timeout": SOCKET_TIMEOUT_SECONDS}
    )


def connect(spec: RedisSpec, credentials: Credentials, namespace: str) -> RedisClient:
    """A client through the shared ``streamqueue.connection`` rules (see ``dialled``)."""
    return connect_any(dialled(spec, credentials, namespace))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
