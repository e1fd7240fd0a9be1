"""How every streamqueue component reaches Redis: ACL user, password (value or file), TLS, timeouts.

One place decides the connection so the worker, the client and the monitor agree on two things that
are easy to get wrong: the socket timeout must outlast the longest blocking read (redis-py 8 cuts any
read at its default 5 s socket timeout, which would turn every long ``BLOCK`` into an error), and the
password must never reach a log line or a ``repr``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, overload
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio.retry import Retry
from redis.backoff import AbstractBackoff, EqualJitterBackoff, ExponentialWithJitterBackoff
from redis.credentials import CredentialProvider
from redis.driver_info import DriverInfo
from redis.exceptions import ClusterError, RedisClusterException, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .aio import wait_set
from .packing import pack_with_hiredis

log = logging.getLogger(__name__)

# Extra seconds the socket timeout allows beyond a BLOCK, so the server's empty reply always wins.
BLOCK_TIMEOUT_MARGIN_S = 5.0
# redis-py retries each command this often on connection errors before the caller sees the error;
# callers with their own loop (the worker) then back off further themselves.
COMMAND_RETRIES = 3
RETRY_BACKOFF_BASE_S = 0.05
RETRY_BACKOFF_CAP_S = 2.0
# The delays of our own retry loops (``retry_transient``) after successive failures.
RETRY_BACKOFF = EqualJitterBackoff(cap=RETRY_BACKOFF_CAP_S, base=RETRY_BACKOFF_BASE_S)
# redis-py PINGs a connection idle longer than this before its next command (a Pub/Sub connection at
# its next read), so a connection a firewall or NAT dropped silently is replaced before it is used:
# every component's Redis user needs +ping (streamqueue.acl). Read at connect time: a test shortens it.
HEALTH_CHECK_INTERVAL_S = 30.0
_SCHEMES = ("redis", "rediss")
# Connections of a pool that makes commands wait for a free one (``connect``'s ``pool_wait_s``); as
# many as redis-py's default pool holds.
POOL_CONNECTIONS = 100
# Deletes KEYS[1] only while it holds ARGV[1] (a holder's token); 1 if it did. For leases and
# watches that a holder gives up: after a pause beyond their TTL another holder may have them, and
# must not lose them to a late release.
DELETE_IF_HELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Errors that mean "Redis is away for a moment": a lost connection, or a cluster without a primary
# for a slot or moving one (CLUSTERDOWN, TRYAGAIN) while it fails over.
CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError)  # the server did not answer
_TRANSIENT = (*CONNECTION_ERRORS, ClusterError, TryAgainError, RedisClusterException)
# What ``connect`` returns: the same commands, one server or a cluster of them.
RedisClient = aioredis.Redis | aioredis.RedisCluster
T = TypeVar("T")


class RedisConnection(BaseModel):
    """Where Redis is and how to authenticate: a plain value, it never reads the environment.

    ``Client("redis://...")`` and the operator build one from what they are given; only the worker's
    and the monitor's settings (``RedisSettings``) read ``STREAMQUEUE_REDIS_*`` and turn it into one.
    """

    model_config = ConfigDict(frozen=True)

    url: str = "redis://localhost:6379/0"
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_ca_data: str | None = Field(default=None, repr=False)  # PEM, e.g. read from a Secret
    socket_timeout: float = Field(default=10.0, gt=0)
    cluster: bool = False

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = urlsplit(url).scheme
        if scheme not in _SCHEMES:
            raise ValueError(f"redis_url must start with redis:// or rediss://, got {scheme or 'no'} scheme")
        return url

    @model_validator(mode="after")
    def _one_source_each(self) -> RedisConnection:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set redis_password or redis_password_file, not both")
        if self.tls_ca_file is not None and self.tls_ca_data is not None:
            raise ValueError("set the CA bundle as a file or as data, not both")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.tls or urlsplit(self.url).scheme == "rediss"

    def password_text(self) -> str | None:
        """The password from the value or its file, read at connect time so a rotated Secret counts."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            try:
                return self.password_file.read_text().rstrip("\r\n")
            except OSError as exc:
                raise ValueError(f"cannot read redis_password_file {self.password_file}: {exc}") from exc
        return None

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """Show the URL redacted: a password embedded in it must not leak through ``repr``/``str``."""
        for name, value in super().__repr_args__():
            yield name, (redact_url(value) if name == "url" else value)

    def safe_url(self) -> str:
        """The URL with any password replaced by ``***``: the only form of it that may be logged."""
        return redact_url(self.url)


class RedisSettings(BaseSettings):
    """The ``STREAMQUEUE_REDIS_*`` variables and ``--redis-*`` flags of the worker and the monitor."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMQUEUE_", extra="ignore", use_attribute_docstrings=True
    )

    redis_url: str = Field(default="redis://localhost:6379/0", repr=False)  # may hold a password
    """redis://host:port/db, or rediss://... for TLS. A password in the URL is never logged."""
    redis_username: str | None = None
    """ACL user."""
    redis_password: SecretStr | None = None
    """Password (in a pod: from a Secret via valueFrom)."""
    redis_password_file: Path | None = None
    """File holding the password (a mounted Secret, re-read on every new connection); not with the above."""
    redis_tls: bool = False
    """TLS even with a redis:// URL."""
    redis_tls_ca_file: Path | None = None
    """CA bundle that signed the server's certificate (default: system CAs)."""
    redis_socket_timeout: float = Field(default=10.0, gt=0)
    """Seconds to wait for a reply; always raised above BLOCK_MS + 5 s."""
    redis_cluster: bool = False
    """The URL names one node of a Redis Cluster; the client discovers the others and follows MOVED/ASK."""

    @model_validator(mode="after")
    def _valid_connection(self) -> RedisSettings:
        self.redis_connection()  # a bad URL or two password sources fail at start-up, by setting name
        return self

    def safe_url(self) -> str:
        """The URL with any password replaced by ``***``: the only form of it that may be logged."""
        return redact_url(self.redis_url)

    def redis_connection(self) -> RedisConnection:
        """The connection these settings describe."""
        fields = RedisSettings.model_fields  # redis_<name> is RedisConnection's <name>
        return RedisConnection(**{name.removeprefix("redis_"): getattr(self, name) for name in fields})


def transient(exc: BaseException) -> bool:
    """True for an error that retrying after a backoff can cure, so loops wait instead of dying.

    Besides connection and cluster-state errors, that includes an error raised inside redis-py's own
    connection code: its asyncio cluster client, while it re-learns the slot map during a failover,
    can close a connection another task is about to write to (an AttributeError on the closed
    writer). That is a passing state of the client, not a bug of the caller.
    """
    if isinstance(exc, _TRANSIENT):
        return True
    return isinstance(exc, AttributeError) and _raised_in_redis_py(exc)


def group_missing(exc: BaseException) -> bool:
    """True for Redis's NOGROUP: the consumer group (or its stream) is gone, e.g. after a restart
    without persistence; the consumer run creates it again."""
    return isinstance(exc, ResponseError) and "NOGROUP" in str(exc)


def _raised_in_redis_py(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}redis{os.sep}" in tb.tb_frame.f_code.co_filename


@overload
async def retry_transient(
    operation: Callable[[], Awaitable[T]],
    on_error: Callable[[Exception, float], object],
    *,
    stop: None = None,
    retryable: Callable[[BaseException], bool] = ...,
    backoff: AbstractBackoff = ...,
) -> T: ...


@overload
async def retry_transient(
    operation: Callable[[], Awaitable[T]],
    on_error: Callable[[Exception, float], object],
    *,
    stop: asyncio.Event,
    retryable: Callable[[BaseException], bool] = ...,
    backoff: AbstractBackoff = ...,
) -> T | None: ...


async def retry_transient(
    operation: Callable[[], Awaitable[T]],
    on_error: Callable[[Exception, float], object],
    *,
    stop: asyncio.Event | None = None,
    retryable: Callable[[BaseException], bool] = transient,
    backoff: AbstractBackoff = RETRY_BACKOFF,
) -> T | None:
    """Await ``operation()`` until it succeeds, waiting out the errors ``retryable`` accepts.

    After each such error ``on_error(error, delay)`` counts or logs it and the next try comes
    ``delay`` later. The delays are ``backoff``'s for the failures of this call, by default redis-py's
    ``EqualJitterBackoff`` (doubling from 50 ms to 2 s, each drawn from its upper half: the jitter
    keeps a fleet from reconnecting in step, the floor keeps a retry from coming at once); a success
    ends the call, so the next one starts from the shortest delay again. Any other error propagates.
    ``stop`` set before a try, or during a wait (which it cuts short), ends the call with None.
    """
    failures = 0
    while stop is None or not stop.is_set():
        try:
            return await operation()
        except Exception as exc:
            if not retryable(exc):
                raise
            delay = backoff.compute(failures)
            failures += 1
            on_error(exc, delay)
        if stop is None:
            await asyncio.sleep(delay)
        else:
            await wait_set(stop, delay)
    return None


async def cluster_ready(
    redis: RedisClient, on_error: Callable[[Exception, float], object], *, stop: asyncio.Event | None = None
) -> None:
    """Have a cluster client learn its slot map before it is used concurrently (a no-op for one server).

    redis-py's asyncio cluster client breaks when many tasks send their first commands while it
    initializes (some fail with AttributeError on a connection it replaced meanwhile); initialized
    once, it serves them all. Waits out transient errors as ``retry_transient`` does (``on_error``,
    ``stop`` likewise).
    """
    if isinstance(redis, aioredis.RedisCluster):
        await retry_transient(redis.initialize, on_error, stop=stop)


class PasswordFileCredentials(CredentialProvider):
    """Reads the password file for every new connection, so a rotated Secret needs no restart."""

    def __init__(self, username: str | None, path: Path) -> None:
        self.username = username
        self.path = path

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self.path.read_text().rstrip("\r\n")
        return (self.username, password) if self.username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


def redact_url(url: str) -> str:
    """``url`` without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def socket_timeout_for(connection: RedisConnection, block_ms: int | None) -> float:
    """A socket timeout that never cuts a ``BLOCK block_ms`` read short."""
    if block_ms is None:
        return connection.socket_timeout
    return max(connection.socket_timeout, block_ms / 1000 + BLOCK_TIMEOUT_MARGIN_S)


def _auth_and_tls(connection: RedisConnection) -> dict[str, object]:
    """redis-py's credential and CA arguments for ``connection``."""
    kwargs: dict[str, object] = {}
    if connection.password_file is not None:
        connection.password_text()  # unreadable file: fail now, with the file's name
        kwargs["credential_provider"] = PasswordFileCredentials(connection.username, connection.password_file)
    else:
        if connection.username is not None:
            kwargs["username"] = connection.username
        if connection.password is not None:
            kwargs["password"] = connection.password.get_secret_value()
    if connection.uses_tls and connection.tls_ca_file is not None:
        kwargs["ssl_ca_certs"] = str(connection.tls_ca_file)
    if connection.uses_tls and connection.tls_ca_data is not None:
        kwargs["ssl_ca_data"] = connection.tls_ca_data
    return kwargs


def connect_any(
    connection: RedisConnection, *, block_ms: int | None = None, pool_wait_s: float | None = None
) -> RedisClient:
    """``connect``, or a cluster client when ``connection.cluster`` is set.

    For a cluster, redis-py follows MOVED/ASK redirections and refreshes its slot map after a
    failover; a command whose keys span slots is refused, so callers keep each call to one slot.
    (A cluster client's pools are unbounded: ``pool_wait_s`` matters for one server only.)
    """
    if connection.cluster:
        return aioredis.RedisCluster.from_url(_url(connection), **_common(connection, block_ms))
    return connect(connection, block_ms=block_ms, pool_wait_s=pool_wait_s)


def connect(
    connection: RedisConnection, *, block_ms: int | None = None, pool_wait_s: float | None = None
) -> aioredis.Redis:
    """An asyncio Redis client (lazy: no I/O until the first command) for one server.

    Replies are decoded as UTF-8 text, commands packed by hiredis (``packing``). ``block_ms`` is the
    longest BLOCK the caller will issue.
    Connection errors are retried with jittered exponential backoff before they surface.
    ``pool_wait_s``: for callers whose concurrent commands are not bounded otherwise (the gateway's,
    one per request in flight): when all ``POOL_CONNECTIONS`` are busy a command waits up to this
    long for one, where redis-py's default pool fails it at once (``MaxConnectionsError``).
    """
    if connection.cluster:
        raise ValueError("a Redis Cluster needs connect_any()")
    kwargs = {
        **_common(connection, block_ms),
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "retry": Retry(
            ExponentialWithJitterBackoff(base=RETRY_BACKOFF_BASE_S, cap=RETRY_BACKOFF_CAP_S),
            COMMAND_RETRIES,
            (RedisConnectionError, RedisTimeoutError),
        ),
    }
    if pool_wait_s is None:
        client = aioredis.Redis.from_url(_url(connection), **kwargs)
    else:
        pool = aioredis.BlockingConnectionPool.from_url(
            _url(connection), max_connections=POOL_CONNECTIONS, timeout=pool_wait_s, **kwargs
        )
        client = aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it
    pack_with_hiredis(client)
    return client


def _url(connection: RedisConnection) -> str:
    url = connection.url
    if connection.tls and url.startswith("redis://"):
        url = "rediss://" + url.removeprefix("redis://")
    return url


def _common(connection: RedisConnection, block_ms: int | None) -> dict[str, Any]:
    """Client arguments shared by a single-server and a cluster client."""
    timeout = socket_timeout_for(connection, block_ms)
    log.debug(
        "redis client for %s (tls=%s, cluster=%s, socket timeout %.1fs)",
        connection.safe_url(), connection.uses_tls, connection.cluster, timeout,
    )  # fmt: skip
    return {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": min(timeout, connection.socket_timeout),
        # What CLIENT SETINFO reports, made once per client: left to redis-py, every new connection
        # reads the package metadata again (about 0.6 ms each; a client opening 1,000 paid 0.6 s).
        "driver_info": DriverInfo(),
        **_auth_and_tls(connection),
    }
