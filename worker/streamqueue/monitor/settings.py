"""What the monitor watches: flags, or the ``STREAMQUEUE_*`` variables the worker reads."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from .. import wire
from ..connection import RedisSettings

# The most partitions a queue can have (the worker's and the operator's bound); detection probes them all.
MAX_PARTITIONS = 1024


class MonitorSettings(RedisSettings):
    """What to watch; every flag also reads ``STREAMQUEUE_<NAME>`` like the worker's settings."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMQUEUE_",
        cli_prog_name="streamqueue-monitor",
        cli_kebab_case=True,
        cli_implicit_flags=True,
    )

    # NoDecode: STREAMQUEUE_STREAM holds one plain name for the worker, not JSON; commas add more.
    stream: Annotated[list[str], NoDecode] = Field(
        default=[wire.DEFAULT_STREAM],
        description="input stream(s) to watch (repeat the flag, or separate names with commas)",
    )
    reply_prefix: str = Field(
        default=wire.DEFAULT_REPLY_PREFIX, description="reply stream prefix (counted with SCAN)"
    )
    dead_letter_stream: str | None = Field(
        default=None, description="dead-letter stream (default: <stream>:dead for each stream)"
    )
    partitions: int | None = Field(
        default=None,
        ge=1,
        le=MAX_PARTITIONS,
        description="partitions of each stream, <stream>:{0}..{N-1} (default: detected from the keys)",
    )
    interval: float = Field(default=1.0, gt=0, description="seconds between refreshes")
    once: bool = Field(default=False, description="print one snapshot and exit (no screen clearing)")

    scan_limit: int = Field(
        default=100_000, gt=0, description="stop counting reply streams after this many keys scanned"
    )

    @field_validator("stream", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        names = [value] if isinstance(value, str) else value
        if isinstance(names, list):
            return [part.strip() for name in names for part in str(name).split(",") if part.strip()]
        return value
