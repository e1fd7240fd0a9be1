"""How every streamqueue component reaches Redis: ACL user, password (env or file), TLS, timeouts.

One place decides the connection so the worker, the client and the monitor agree on two things that
are easy to get wrong: the socket timeout must outlast the longest blocking read (redis-py 8 cuts any
read at its default 5 s socket timeout, which would turn every long ``BLOCK`` into an error), and the
password must never reach a log line or a ``repr``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

# Extra seconds the socket timeout allows beyond a BLOCK, so the server's empty reply always wins.
BLOCK_TIMEOUT_MARGIN_S = 5.0
# redis-py retries each command this often on connection errors before the caller sees the error;
# callers with their own loop (the worker) then back off further themselves.
COMMAND_RETRIES = 3
RETRY_BACKOFF_BASE_S = 0.05
RETRY_BACKOFF_CAP_S = 2.0
_SCHEMES = ("redis", "rediss")


class RedisConnectionSettings(BaseSettings):
    """Where Redis is and how to authenticate; every field also reads ``STREAMQUEUE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="STREAMQUEUE_", extra="ignore")

    redis_url: str = Field(
        default="redis://localhost:6379/0",
        description="redis://host:port/db, or rediss://... for TLS (a password in the URL is never logged)",
    )
    redis_username: str | None = Field(default=None, description="ACL user name")
    redis_password: SecretStr | None = Field(default=None, description="password (prefer the _file form)")
    redis_password_file: Path | None = Field(
        default=None,
        description="file holding the password (e.g. a mounted Secret); trailing newline ignored",
    )
    redis_tls: bool = Field(default=False, description="use TLS even if the URL says redis://")
    redis_tls_ca_file: Path | None = Field(default=None, description="CA bundle to verify the server with")
    redis_socket_timeout: float = Field(
        default=10.0,
        gt=0,
        description="seconds to wait for a reply; raised automatically above any blocking read",
    )

    @field_validator("redis_url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = urlsplit(url).scheme
        if scheme not in _SCHEMES:
            raise ValueError(f"redis_url must start with redis:// or rediss://, got {scheme or 'no'} scheme")
        return url

    @model_validator(mode="after")
    def _one_password_source(self) -> RedisConnectionSettings:
        if self.redis_password is not None and self.redis_password_file is not None:
            raise ValueError("set redis_password or redis_password_file, not both")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.redis_tls or urlsplit(self.redis_url).scheme == "rediss"

    def password(self) -> str | None:
        """The password from the setting or its file, read at connect time so a rotated Secret counts."""
        if self.redis_password is not None:
            return self.redis_password.get_secret_value()
        if self.redis_password_file is not None:
            try:
                return self.redis_password_file.read_text().rstrip("\r\n")
            except OSError as exc:
                raise ValueError(
                    f"cannot read redis_password_file {self.redis_password_file}: {exc}"
                ) from exc
        return None

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """Show the URL redacted: a password embedded in it must not leak through ``repr``/``str``."""
        for name, value in super().__repr_args__():
            yield name, (redact_url(value) if name == "redis_url" else value)

    def safe_url(self) -> str:
        """The URL with any password replaced by ``***``: the only form of it that may be logged."""
        return redact_url(self.redis_url)


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


def socket_timeout_for(settings: RedisConnectionSettings, block_ms: int | None) -> float:
    """A socket timeout that never cuts a ``BLOCK block_ms`` read short."""
    if block_ms is None:
        return settings.redis_socket_timeout
    return max(settings.redis_socket_timeout, block_ms / 1000 + BLOCK_TIMEOUT_MARGIN_S)


def connect(settings: RedisConnectionSettings, *, block_ms: int | None = None) -> aioredis.Redis:
    """An asyncio Redis client (lazy: no I/O until the first command) for ``settings``.

    Replies are decoded as UTF-8 text. ``block_ms`` is the longest BLOCK the caller will issue.
    Connection errors are retried with jittered exponential backoff before they surface.
    """
    url = settings.redis_url
    if settings.redis_tls and url.startswith("redis://"):
        url = "rediss://" + url.removeprefix("redis://")
    kwargs: dict[str, object] = {}
    if settings.redis_password_file is not None:
        settings.password()  # unreadable file: fail now, with the file's name
        kwargs["credential_provider"] = PasswordFileCredentials(
            settings.redis_username, settings.redis_password_file
        )
    else:
        if settings.redis_username is not None:
            kwargs["username"] = settings.redis_username
        if settings.redis_password is not None:
            kwargs["password"] = settings.redis_password.get_secret_value()
    if settings.uses_tls and settings.redis_tls_ca_file is not None:
        kwargs["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
    timeout = socket_timeout_for(settings, block_ms)
    log.debug(
        "redis client for %s (tls=%s, socket timeout %.1fs)", settings.safe_url(), settings.uses_tls, timeout
    )
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, settings.redis_socket_timeout),
        health_check_interval=30,
        retry=Retry(
            ExponentialWithJitterBackoff(base=RETRY_BACKOFF_BASE_S, cap=RETRY_BACKOFF_CAP_S),
            COMMAND_RETRIES,
            (RedisConnectionError, RedisTimeoutError),
        ),
        **kwargs,  # type: ignore[arg-type]
    )
