"""The gateway's configuration: one YAML file (``--config``, or ``STREAMQUEUE_GATEWAY_CONFIG``).

Declared once as pydantic models with camelCase aliases, so the chart's ``gateway.config`` values,
the file and the code use the same names, and a misspelt key fails at start-up (``extra="forbid"``)
instead of being ignored. The Redis password never sits in the file (a ConfigMap): it comes from
``STREAMQUEUE_REDIS_PASSWORD`` or ``redis.passwordFile`` (a mounted Secret).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from pydantic import Field, SecretStr, field_validator, model_validator
from streamqueue import wire
from streamqueue.connection import RedisConnection

from .auth import AuthConfig
from .filemodel import FileModel
from .quotas import TierLimits

CONFIG_ENV = "STREAMQUEUE_GATEWAY_CONFIG"
PASSWORD_ENV = "STREAMQUEUE_REDIS_PASSWORD"
# A model name is part of URLs and metric labels: keep it plain.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
# resumeGraceSeconds must cover this many of a browser's reconnect delays (sseRetrySeconds): the first
# attempt comes one delay after the drop; if it fails (the replica it reached is stopping, the Service
# not yet updated) the next comes one more delay later; the third delay is the margin for connecting
# and for a browser that stretches its delay (Chromium and Firefox wait the server's ``retry:`` value;
# a busy tab's timers run late).
RECONNECT_DELAYS = 3
# After shutdownTimeoutSeconds, what is left of a stop (cancelling the streams still open, closing the
# Redis clients) gets this long before the process exits regardless.
SHUTDOWN_MARGIN_S = 3.0


class RedisConfig(FileModel):
    """The queue's Redis, as ``streamqueue.connection.RedisConnection`` takes it, minus the password."""

    url: str = "redis://localhost:6379/0"
    username: str | None = None
    password_file: Path | None = None
    tls: bool = False
    tls_ca_file: Path | None = None
    cluster: bool = False
    socket_timeout: float = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _no_password_in_url(cls, url: str) -> str:
        if urlsplit(url).password:
            raise ValueError(f"the Redis password goes in {PASSWORD_ENV} or redis.passwordFile, not the URL")
        return url

    def connection(self) -> RedisConnection:
        """The connection, with the password from the environment unless a password file is set."""
        password = os.environ.get(PASSWORD_ENV) if self.password_file is None else None
        return RedisConnection(**self.model_dump(), password=SecretStr(password) if password else None)


class ModelConfig(FileModel):
    """One model the gateway serves: the streamqueue whose workers run it."""

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    stream: str = Field(default=wire.DEFAULT_STREAM, min_length=1)
    partitions: int = Field(default=1, ge=1)
    group: str = Field(default=wire.DEFAULT_GROUP, min_length=1)
    reply_prefix: str = Field(default=wire.DEFAULT_REPLY_PREFIX, min_length=1)
    max_backlog: int = Field(default=1000, ge=0)  # lag + pending above this: 503; 0 = off
    max_message_bytes: int = Field(default=1_048_576, ge=1)  # keep it the queue's MAX_MESSAGE_BYTES


class GatewayConfig(FileModel):
    """The whole file."""

    redis: RedisConfig = RedisConfig()
    models: list[ModelConfig] = Field(min_length=1)
    auth: AuthConfig = AuthConfig()
    tiers: dict[str, TierLimits] = Field(default_factory=lambda: {"free": TierLimits()})
    request_timeout_seconds: float = Field(default=120.0, gt=0)  # wait for the next chunk
    resume_grace_seconds: float = Field(default=10.0, gt=0)  # a dropped browser stream is cancelled after
    sse_retry_seconds: float = Field(default=1.0, gt=0)  # SSE ``retry:``: a browser reconnects after
    request_ttl_seconds: int = Field(default=3600, ge=1)  # a browser request id stays resumable this long
    backlog_refresh_seconds: float = Field(default=1.0, gt=0)  # one XINFO read per model per this
    namespace: str = Field(default="streamqueue-gateway", pattern=r"^[A-Za-z0-9_.:-]+$")  # Redis key prefix
    # SIGTERM: /readyz fails at once, requests are still taken for shutdownDelaySeconds (while load
    # balancers and the Service's endpoints drop the pod), then the port closes and the requests in
    # flight get shutdownTimeoutSeconds to finish; the pod's terminationGracePeriodSeconds must exceed
    # the whole (``shutdown_bound_seconds``).
    shutdown_delay_seconds: float = Field(default=5.0, ge=0)
    shutdown_timeout_seconds: float = Field(default=20.0, gt=0)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique: {names}")
        return models

    @model_validator(mode="after")
    def _grace_outlasts_reconnects(self) -> GatewayConfig:
        """A grace shorter than a browser takes to reconnect cancels the streams it was meant to keep."""
        least = RECONNECT_DELAYS * self.sse_retry_seconds
        if self.resume_grace_seconds < least:
            raise ValueError(
                f"resumeGraceSeconds ({self.resume_grace_seconds:g}) must be at least {RECONNECT_DELAYS} x "
                f"sseRetrySeconds ({least:g} s), or a browser's reconnect finds its request cancelled"
            )
        return self

    @property
    def shutdown_bound_seconds(self) -> float:
        """The longest a stop takes from SIGTERM to the process's exit."""
        return self.shutdown_delay_seconds + self.shutdown_timeout_seconds + SHUTDOWN_MARGIN_S

    @property
    def sse_retry(self) -> bytes:
        """The event stream's first block: how long EventSource waits before it reconnects."""
        return f"retry: {round(self.sse_retry_seconds * 1000)}\n\n".encode()


def load_config(path: Path | str | None = None) -> GatewayConfig:
    """Read the YAML file at ``path`` (default: ``$STREAMQUEUE_GATEWAY_CONFIG``)."""
    if path is None:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            raise ValueError(f"no configuration file: pass --config or set {CONFIG_ENV}")
    data = yaml.safe_load(Path(path).read_text())
    return GatewayConfig.model_validate(data or {})
