"""Per-user and per-tier quotas (requests queued + running, tokens per minute), atomic in Redis.

Stub of the public interface (issue 22's contract); the implementation follows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel
from streamqueue.connection import RedisClient

from .auth import Principal


class TierLimits(BaseModel):
    """One tier's limits; 0 = unlimited."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    max_requests: int = 0
    tokens_per_minute: int = 0
    tier_max_requests: int = 0
    tier_tokens_per_minute: int = 0


class OverQuota(Exception):
    """A limit is reached: the app answers 429 with ``Retry-After: ceil(retry_after_s)``."""

    def __init__(self, limit: str, retry_after_s: float) -> None:
        super().__init__(f"{limit} reached, retry after {retry_after_s:.1f} s")
        self.limit = limit
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Admission:
    """What ``finish`` needs to release an admitted request's slot and debit its tokens."""

    user_id: str
    tier: str
    request_id: str


class Quotas:
    def __init__(self, redis: RedisClient, tiers: Mapping[str, TierLimits], *, namespace: str) -> None:
        self._redis = redis
        self._tiers = dict(tiers)
        self._namespace = namespace

    async def admit(self, principal: Principal, request_id: str) -> Admission:
        """Take a slot for ``request_id`` or raise OverQuota (KeyError for an unknown tier)."""
        raise NotImplementedError

    async def finish(self, admission: Admission, tokens: int) -> None:
        """Release the slot and debit ``tokens`` from the user's and the tier's minute."""
        raise NotImplementedError
