"""The worker's settings: one field per ``STREAMQUEUE_*`` environment variable and ``--flag``.

The operator renders exactly these variable names into the worker pod, so a field rename here is a
breaking change for every deployed StreamQueue. Defaults are the article's names (see ``wire``).
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from . import wire
from .connection import RedisConnectionSettings

ECHO_HANDLER = "streamqueue.handlers.echo:handle"
HTTP_HANDLER = "streamqueue.handlers.http:handle"
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def default_consumer() -> str:
    """The pod's name (so the operator can match consumers to pods), else the host name."""
    return os.environ.get("POD_NAME") or socket.gethostname()


class WorkerSettings(RedisConnectionSettings):
    """Everything a worker process needs; read from flags, then ``STREAMQUEUE_*``, then defaults."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMQUEUE_",
        extra="ignore",
        cli_prog_name="streamqueue-worker",
        cli_kebab_case=True,
        cli_implicit_flags=True,
    )

    stream: str = Field(default=wire.DEFAULT_STREAM, min_length=1, description="input stream")
    group: str = Field(default=wire.DEFAULT_GROUP, min_length=1, description="consumer group")
    consumer: str = Field(
        default_factory=default_consumer,
        min_length=1,
        description="consumer name (default: POD_NAME, hostname)",
    )
    reply_prefix: str = Field(
        default=wire.DEFAULT_REPLY_PREFIX, min_length=1, description="reply stream is <prefix><user_id>"
    )
    handler: str = Field(
        default=ECHO_HANDLER,
        description="module:function (default: echo, or the HTTP handler if only handler-url is set)",
    )
    handler_url: str | None = Field(default=None, description="URL the HTTP handler POSTs each message to")
    handler_timeout_seconds: float = Field(default=30.0, gt=0, description="HTTP handler timeout per attempt")
    handler_retries: int = Field(default=2, ge=0, le=20, description="HTTP handler retries after a failure")
    batch_size: int = Field(default=50, ge=1, le=1000, description="entries per XREADGROUP")
    concurrency: int = Field(default=100, ge=1, le=10_000, description="messages in flight per process")
    block_ms: int = Field(default=2000, ge=1, le=60_000, description="XREADGROUP BLOCK in milliseconds")
    claim_idle_ms: int = Field(
        default=30_000,
        ge=100,
        le=86_400_000,
        description="reclaim pending entries idle this long (XAUTOCLAIM)",
    )
    max_deliveries: int = Field(
        default=5, ge=1, le=1000, description="deliveries before an entry is dead-lettered"
    )
    dead_letter_stream: str | None = Field(
        default=None, min_length=1, description="dead-letter stream (default <stream>:dead)"
    )
    error_replies: bool = Field(
        default=True, description="send the user an error reply when their message is dead-lettered"
    )
    stream_replies: bool = Field(
        default=True,
        description="write chunk entries as an async-iterator handler yields them (off: final reply only)",
    )
    reply_maxlen: int = Field(default=1000, ge=1, le=10_000_000, description="MAXLEN ~ of each reply stream")
    reply_ttl_seconds: int = Field(
        default=3600, ge=1, le=31_536_000, description="reply streams expire after this long unwritten"
    )
    max_message_bytes: int = Field(
        default=1_048_576, ge=1, le=536_870_912, description="larger messages are dead-lettered"
    )
    shutdown_grace_seconds: float = Field(
        default=30.0, ge=0, le=3600, description="time to finish in-flight work after SIGTERM"
    )
    health_port: int = Field(
        default=8080, ge=0, le=65_535, description="port of /healthz, /readyz, /metrics (0 = off)"
    )
    health_host: str = Field(default="0.0.0.0", description="address the health port binds")
    log_level: LogLevel = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> WorkerSettings:
        if "handler" not in self.model_fields_set and self.handler_url is not None:
            self.handler = HTTP_HANDLER
        if ":" not in self.handler:
            raise ValueError(f"handler must be module:function, got {self.handler!r}")
        if self.dead_letter() == self.stream:
            raise ValueError("dead_letter_stream must differ from the input stream")
        if self.stream.startswith(self.reply_prefix):
            raise ValueError(
                f"input stream {self.stream!r} starts with reply_prefix {self.reply_prefix!r}: "
                "replies would be written into the queue's key space"
            )
        return self

    def dead_letter(self) -> str:
        """The dead-letter stream actually used."""
        return self.dead_letter_stream or wire.dead_letter_stream(self.stream)

    @property
    def renew_interval_s(self) -> float:
        """How often long-running entries refresh their claim: well inside the claim idle time."""
        return self.claim_idle_ms / 3000
