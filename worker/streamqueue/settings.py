"""The worker's settings: one field per ``STREAMQUEUE_*`` environment variable and ``--flag``.

This class is the worker contract's one declaration. The operator derives from it the StreamQueue's
``spec.worker`` tuning fields (``TUNING_FIELDS``: name, type, bounds, description), the variables it
renders into the pod (``env_name``) and the defaults it needs (health port, shutdown grace); the docs'
settings table is generated from it too. A field rename here is therefore a breaking change for
every deployed StreamQueue. Defaults are the article's names (see ``wire``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from . import wire
from .connection import RedisSettings

ECHO_HANDLER = "streamqueue.handlers.echo:handle"
HTTP_HANDLER = "streamqueue.handlers.http:handle"
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
Ordering = Literal["none", "perUser"]
Fairness = Literal["none", "perUser"]
GroupStartId = Literal["0", "$"]
ENV_PREFIX = "STREAMQUEUE_"
# Field patterns are copied into the StreamQueue CRD with the fields, so the API server refuses what
# the worker would (RE2, ECMAScript and Rust regex alike).
HANDLER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"  # module:function (or attribute)
HTTP_URL_PATTERN = r"^https?://[^\s/?#]+([/?#]\S*)?$"


def env_name(field: str) -> str:
    """The environment variable that sets ``field``: what the operator writes into the pod."""
    return ENV_PREFIX + field.upper()


def default_consumer() -> str:
    """The pod's name (so the operator can match consumers to pods), else the host name."""
    return os.environ.get("POD_NAME") or socket.gethostname()


class WorkerSettings(RedisSettings):
    """Everything a worker process needs; read from flags, then ``STREAMQUEUE_*``, then defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        cli_prog_name="streamqueue-worker",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        use_attribute_docstrings=True,  # each field's docstring is its description (--help, CRD, docs)
    )

    stream: str = Field(default=wire.DEFAULT_STREAM, min_length=1)
    """Input stream."""
    group: str = Field(default=wire.DEFAULT_GROUP, min_length=1)
    """Consumer group (created with MKSTREAM at group_start_id if missing)."""
    group_start_id: GroupStartId = Field(default="0")
    """Where a new group starts: 0 serves the stream's whole history, $ only entries added after."""
    consumer: str = Field(default_factory=default_consumer, min_length=1)
    """Consumer name (default: $POD_NAME, else the host name); the operator matches pods."""
    reply_prefix: str = Field(default=wire.DEFAULT_REPLY_PREFIX, min_length=1)
    """Replies go to <prefix><user_id>."""
    partitions: int = Field(default=1, ge=1, le=1024)
    """Partition streams <stream>:{0}..{N-1}; user U's go to CRC-32(U) mod N (1: the stream itself)."""
    ordering: Ordering = Field(default="none")
    """perUser: one worker at a time per partition (a lease); a user's messages run one by one, in order."""
    fairness: Fairness = Field(default="none")
    """perUser: entries start round-robin across users, so one user's burst cannot hold back others'."""
    lease_ttl_ms: int = Field(default=5000, ge=500, le=600_000)
    """perUser: a partition's lease lapses this long after its worker stops renewing it."""
    handler: str = Field(default=ECHO_HANDLER, max_length=512, pattern=HANDLER_PATTERN)
    """Python handler as module:function; the HTTP handler if only handler_url is set."""
    handler_url: str | None = Field(default=None, max_length=2048, pattern=HTTP_URL_PATTERN)
    """Where the HTTP handler POSTs each message."""
    handler_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    """HTTP handler timeout per attempt."""
    handler_retries: int = Field(default=2, ge=0, le=20)
    """HTTP handler retries (timeouts, connection errors, 429, 5xx)."""
    batch_size: int = Field(default=50, ge=1, le=1000)
    """Entries per XREADGROUP / XAUTOCLAIM."""
    concurrency: int = Field(default=100, ge=1, le=10_000)
    """Messages in flight per process."""
    block_ms: int = Field(default=2000, ge=1, le=60_000)
    """XREADGROUP BLOCK in milliseconds."""
    claim_idle_ms: int = Field(default=30_000, ge=100, le=86_400_000)
    """Pending entries idle this long are reclaimed (XAUTOCLAIM)."""
    max_deliveries: int = Field(default=5, ge=1, le=1000)
    """Handler attempts before an entry is dead-lettered."""
    max_queue_age_seconds: float | None = Field(default=None, gt=0, le=31_536_000)
    """Entries older than this (from their id's time, set at XADD) get an expired reply, not the handler."""
    dead_letter_stream: str | None = Field(default=None, min_length=1, max_length=256)
    """Where invalid and poison entries go (default: <stream>:dead)."""
    dead_letter_max_len: int = Field(default=100_000, ge=1, le=100_000_000)
    """MAXLEN ~ of each dead-letter stream; entries trimmed off it are counted in a metric."""
    error_replies: bool = Field(default=True)
    """Tell the user (on their reply stream) when their message was dead-lettered."""
    stream_replies: bool = Field(default=True)
    """Write chunk entries as an async-iterator handler yields them; false: final reply only."""
    chunk_flush_ms: int = Field(default=10, ge=0, le=1000)
    """Chunks wait up to this long to be written together (a reply's first goes at once); one reply's
    chunks that wait together become one entry. 0: every chunk is its own entry, written at once."""
    reply_maxlen: int = Field(default=1000, ge=1, le=10_000_000)
    """MAXLEN ~ of each reply stream."""
    reply_ttl_seconds: int = Field(default=3600, ge=1, le=31_536_000)
    """A reply stream expires this long after its last reply, unless a group reads it."""
    max_message_bytes: int = Field(default=1_048_576, ge=1, le=536_870_912)
    """Larger messages (UTF-8 bytes) are dead-lettered."""
    shutdown_grace_seconds: float = Field(default=30.0, ge=0, le=3600)
    """Time in-flight work gets after SIGTERM."""
    health_port: int = Field(default=8080, ge=0, le=65_535)
    """Port of /healthz, /readyz, /metrics; 0 turns it off."""
    health_host: str = Field(default="0.0.0.0")
    """Address the health port binds."""
    log_level: LogLevel = Field(default="INFO")
    """DEBUG, INFO, WARNING or ERROR."""
    otel_tracing: bool | None = Field(default=None)
    """OpenTelemetry traces (the streamqueue[otel] extra); unset: on when OTEL_EXPORTER_OTLP_ENDPOINT
    or OTEL_TRACES_EXPORTER is set. The standard OTEL_* variables configure the rest."""
    # The model handler (streamqueue.handlers.openai:handle): an OpenAI-compatible chat server.
    openai_base_url: str | None = Field(default=None, max_length=2048, pattern=HTTP_URL_PATTERN)
    """Model handler: the API's base URL, e.g. http://vllm:8000/v1 (POSTs <url>/chat/completions)."""
    openai_model: str | None = Field(default=None, max_length=256)
    """Model handler: the model name sent with each request."""
    openai_api_key: SecretStr | None = Field(default=None, exclude=True)
    """Model handler: the API key (Bearer token); on Kubernetes from worker.openaiApiKeySecretRef."""
    openai_system_prompt: str | None = Field(default=None, max_length=65_536)
    """Model handler: the system message sent first in every conversation."""
    openai_max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    """Model handler: max_tokens of each completion (unset: the server's default)."""
    openai_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    """Model handler: the longest wait for the connection, the first token, and between tokens."""
    openai_retries: int = Field(default=3, ge=0, le=20)
    """Model handler: retries on 429 (after Retry-After), 5xx, timeouts and connection errors."""
    openai_memory_turns: int = Field(default=0, ge=0, le=1000)
    """Model handler: exchanges remembered per user and sent as history; 0 keeps no memory."""
    openai_memory_ttl_seconds: int = Field(default=86_400, ge=1, le=31_536_000)
    """Model handler: a user's memory expires this long after their last exchange."""
    # Limits toward the model API, shared by every worker of the queue (handlers that call it obey them).
    model_requests_per_minute: int | None = Field(default=None, ge=1, le=100_000_000)
    """Model API: calls started per minute, over all workers of the queue (unset: no limit)."""
    model_tokens_per_minute: int | None = Field(default=None, ge=1, le=10_000_000_000)
    """Model API: tokens per minute as the handler reports them, over all workers (unset: no limit)."""
    model_concurrent_calls: int | None = Field(default=None, ge=1, le=1_000_000)
    """Model API: calls in progress at once, over all workers of the queue (unset: no limit)."""

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> WorkerSettings:
        if "handler" not in self.model_fields_set and self.handler_url is not None:
            self.handler = HTTP_HANDLER
        broken = [rule.message for rule in RULES if not rule.holds(self)]
        if broken:
            raise ValueError("; ".join(broken))
        return self

    def dead_letter(self, partition: str | None = None) -> str:
        """The dead-letter stream actually used (by default one per partition, in its hash slot)."""
        return self.dead_letter_stream or wire.dead_letter_stream(partition or self.stream)

    @property
    def partition_streams(self) -> list[str]:
        return wire.partition_streams(self.stream, self.partitions)

    @property
    def renew_interval_s(self) -> float:
        """How often long-running entries refresh their claim: well inside the claim idle time."""
        return self.claim_idle_ms / 3000


@dataclass(frozen=True)
class Rule:
    """A rule across settings, declared once and checked twice with the same message: by the worker
    on start (``holds``) and by the API server on admission (``cel``: the rule on the StreamQueue's
    ``spec`` after defaulting; ``field_path``: the spec field the refusal names). So a StreamQueue
    the API server accepts renders a worker that starts (tests/operator/test_admission_kube.py).
    """

    message: str
    holds: Callable[[WorkerSettings], bool]
    cel: str  # has() guards every field: the API server also checks the CRD's default, {}, as is
    field_path: str


def _fair_keys_share_slots(s: WorkerSettings) -> bool:
    """perUser fairness keys each partition's queue in the partition's hash slot (``wire.fair_key``)."""
    if s.fairness != "perUser":
        return True
    try:
        for stream in s.partition_streams:
            wire.fair_key(stream)
    except ValueError:
        return False
    return True


RULES = (
    Rule(
        "the input stream must not start with reply_prefix (spec.replyPrefix): "
        "replies would be written into the queue's key space",
        lambda s: not s.stream.startswith(s.reply_prefix),
        "!has(self.stream) || !has(self.replyPrefix) || !self.stream.startsWith(self.replyPrefix)",
        ".stream",
    ),
    Rule(
        "dead_letter_stream (spec.worker.deadLetterStream) must differ from the input stream",
        lambda s: s.dead_letter() != s.stream,
        "!has(self.worker) || !has(self.worker.deadLetterStream) || !has(self.stream) || "
        "self.worker.deadLetterStream != self.stream",
        ".worker.deadLetterStream",
    ),
    Rule(
        "dead_letter_stream (spec.worker.deadLetterStream) must differ from every partition stream "
        "(<stream>:{0} to <stream>:{partitions-1}): dead letters would be fed back into the queue",
        lambda s: s.partitions == 1 or s.dead_letter() not in s.partition_streams,
        # wire.partition_stream: the stream, ':{', a partition number below partitions (no leading
        # zero, at most four digits as partitions <= 1024), '}'.
        "!has(self.worker) || !has(self.worker.deadLetterStream) || !has(self.stream) || "
        "!has(self.partitions) || self.partitions == 1 || "
        "!self.worker.deadLetterStream.startsWith(self.stream + ':{') || "
        "!self.worker.deadLetterStream.endsWith('}') || "
        "!self.worker.deadLetterStream.substring(size(self.stream) + 2, "
        "size(self.worker.deadLetterStream) - 1).matches('^(0|[1-9][0-9]{0,3})$') || "
        "int(self.worker.deadLetterStream.substring(size(self.stream) + 2, "
        "size(self.worker.deadLetterStream) - 1)) >= self.partitions",
        ".worker.deadLetterStream",
    ),
    Rule(
        "with fairness perUser and one partition the input stream needs no braces or a Redis Cluster "
        "hash tag such as {q}: the fair-queue keys must share its hash slot",
        _fair_keys_share_slots,
        # wire.same_slot_key: no brace at all, or a '}' at least two characters after the first '{'.
        "!has(self.worker) || !has(self.worker.fairness) || self.worker.fairness != 'perUser' || "
        "!has(self.stream) || (has(self.partitions) && self.partitions > 1) || "
        "!self.stream.matches('[{}]') || self.stream.matches('(?s)^[^{]*[{].+[}]')",
        ".stream",
    ),
)


def from_environ(environ: Mapping[str, str]) -> WorkerSettings:
    """The settings a worker started with exactly ``environ`` and no flags would have.

    Parsed by pydantic-settings' own environment source, as in the pod, but from ``environ`` rather
    than ``os.environ``: the operator checks a rendered pod's variables in-process with it.
    """
    source = EnvSettingsSource(WorkerSettings)
    source.env_vars = parse_env_vars(
        environ, source.case_sensitive, source.env_ignore_empty, source.env_parse_none_str
    )
    return WorkerSettings.model_validate(source())


# The defaults the operator must know to render a pod (port to probe, grace to outlast).
DEFAULT_HEALTH_PORT: int = WorkerSettings.model_fields["health_port"].default
DEFAULT_SHUTDOWN_GRACE_SECONDS: float = WorkerSettings.model_fields["shutdown_grace_seconds"].default

# The settings a StreamQueue's spec.worker may set: all but the connection and those the operator
# decides itself (queue names and partitions, consumer = pod name, the health port it probes) or
# that make no sense in a pod (health_host). A new worker setting is a new StreamQueue field without
# further code.
_OPERATORS = {
    *("stream", "group", "consumer", "reply_prefix"),  # the queue's shape
    *("partitions", "ordering", "group_start_id"),
    *("health_port", "health_host"),
}
# Secrets reach the pod only as secretKeyRef variables, each from its own spec field.
_SECRETS = {"openai_api_key"}
TUNING_FIELDS = tuple(
    f for f in WorkerSettings.model_fields if f not in {*RedisSettings.model_fields, *_OPERATORS, *_SECRETS}
)
