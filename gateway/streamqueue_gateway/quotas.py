"""Per-user and per-tier quotas (requests queued + running, tokens per minute), atomic in Redis.

Every gateway replica asks the same Redis, and each decision is one Lua script, so replicas never
admit more together than the limits allow. The model follows the workers' model-API limits
(``streamqueue.limits``), at two levels at once:

- requests queued + running: a sorted set of leases (score: expiry in ms, on the time of Redis) per user
  and one per tier. ``Quotas`` renews the leases of its own requests every ``lease_s / 3``, so a
  gateway that crashes frees its slots ``lease_s`` (30 s) after its last renewal; a request that
  finishes frees its slot at once. A lease that lapsed (Redis unreachable for ``lease_s``) is never
  revived: its request runs on uncounted rather than risk a phantom slot.
- tokens per minute: GCRA over a bucket of one minute's tokens. One key holds the time at which the
  debited tokens are refilled (``full``); a request may start while the bucket is not empty
  (``full - now < 60 s``). A reply's tokens are known only when it ends, so they are debited then
  (``finish``): a burst of large replies puts the bucket in debt and later requests wait it out.

Retry-After: for tokens, exactly the time until the bucket holds a token again; for a slot, the time
until the oldest lease would lapse, at most ``slot_retry_s`` (1 s), since a running request's end cannot
be known in advance and an early retry costs one script call.

All keys of a tier share the hash tag ``{<namespace>/<tier>}``, so one script touches one slot of a
Redis Cluster; a tier's quota traffic therefore lands on one primary (a few commands per request).
Redis unreachable: ``admit`` fails closed with ``Overloaded`` (503), never admits unchecked.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
from pydantic import Field
from streamqueue.connection import RedisClient
from streamqueue.limits.scripts import RENEW

from .auth import AuthError, Principal
from .backpressure import Overloaded
from .filemodel import FileModel

log = logging.getLogger(__name__)

LEASE_S = 30.0
SLOT_RETRY_S = 1.0
# Redis must answer a quota call within this, or the request is refused (503) rather than held.
TIMEOUT_S = 2.0
# Overloaded's reason when Redis did not answer a quota call (the rejected-requests metric's label).
UNANSWERED = "quotas"


class Limit(StrEnum):
    """The limits by name, as ``OverQuota.limit`` and the rejected-requests metric report them. The
    admission script names the limit it refused by its position in this order (1-based)."""

    MAX_REQUESTS = "max_requests"
    TOKENS_PER_MINUTE = "tokens_per_minute"
    TIER_MAX_REQUESTS = "tier_max_requests"
    TIER_TOKENS_PER_MINUTE = "tier_tokens_per_minute"


_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: user slots, user tokens, tier slots, tier tokens (one hash slot). ARGV: user member, tier member,
# max requests, tpm, tier max requests, tier tpm, lease ms, slot retry ms.
# Returns {1, 0} admitted (a slot taken), or {0, wait ms, index of the binding limit in KEYS}.
ADMIT = (
    _PRELUDE
    + """
local lease, slot_retry = tonumber(ARGV[7]), tonumber(ARGV[8])
local function slot_wait(key, member, limit)
  if limit <= 0 then return 0 end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZSCORE', key, member) or redis.call('ZCARD', key) < limit then return 0 end
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return math.max(1, math.min(tonumber(oldest[2]) - now, slot_retry))
end
local function token_wait(key, tpm)
  if tpm <= 0 then return 0 end
  local full = tonumber(redis.call('GET', key) or '0')
  return math.max(0, full - now - 60000 + 1)
end
local waits = {
  slot_wait(KEYS[1], ARGV[1], tonumber(ARGV[3])), token_wait(KEYS[2], tonumber(ARGV[4])),
  slot_wait(KEYS[3], ARGV[2], tonumber(ARGV[5])), token_wait(KEYS[4], tonumber(ARGV[6])),
}
local wait, binding = 0, 0
for i = 1, 4 do
  if waits[i] > wait then wait, binding = waits[i], i end
end
if wait > 0 then return {0, math.ceil(wait), binding} end
local function hold(key, member, limit)
  if limit <= 0 then return end
  redis.call('ZADD', key, now + lease, member)
  redis.call('PEXPIRE', key, lease * 2)
end
hold(KEYS[1], ARGV[1], tonumber(ARGV[3]))
hold(KEYS[3], ARGV[2], tonumber(ARGV[5]))
return {1, 0}
"""
)

# KEYS: as ADMIT's. ARGV: user member, tier member, tokens, tpm, tier tpm. Frees the slot, debits tokens.
FINISH = (
    _PRELUDE
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
local tokens = tonumber(ARGV[3])
local function debit(key, tpm)
  if tpm <= 0 or tokens <= 0 then return end
  local full = math.max(tonumber(redis.call('GET', key) or '0'), now) + tokens * 60000 / tpm
  redis.call('SET', key, string.format('%.3f', full), 'PX', math.ceil(full - now) + 1000)
end
debit(KEYS[2], tonumber(ARGV[4]))
debit(KEYS[4], tonumber(ARGV[5]))
return 1
"""
)


class TierLimits(FileModel):
    """One tier's limits; 0 = unlimited."""

    max_requests: int = Field(default=0, ge=0)
    """Per user: requests queued + running."""
    tokens_per_minute: int = Field(default=0, ge=0)
    """Per user: tokens (prompt + reply) per minute."""
    tier_max_requests: int = Field(default=0, ge=0)
    """The whole tier together: requests queued + running."""
    tier_tokens_per_minute: int = Field(default=0, ge=0)
    """The whole tier together: tokens per minute."""

    @property
    def unlimited(self) -> bool:
        """No limit at all: admitting and finishing need no Redis round trip."""
        return not (
            self.max_requests
            or self.tokens_per_minute
            or self.tier_max_requests
            or self.tier_tokens_per_minute
        )


class OverQuota(Exception):
    """A limit is reached: the app answers 429 with ``Retry-After: ceil(retry_after_s)``."""

    def __init__(self, limit: str, retry_after_s: float) -> None:
        super().__init__(f"{limit} reached, retry after {retry_after_s:.3f} s")
        self.limit = limit
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Admission:
    """What ``finish`` needs to release an admitted request's slot and debit its tokens."""

    user_id: str
    tier: str
    request_id: str


def _keys(namespace: str, tier: str, user_id: str) -> list[str]:
    """ADMIT's and FINISH's KEYS: user slots, user tokens, tier slots, tier tokens, all in one hash slot.
    A user_id has no colon (``wire.user_id_rejection``), so ``u:<user>`` never meets ``tier``."""
    tag = f"quota:{{{namespace}/{tier}}}"
    user = f"{tag}:u:{user_id}"
    return [f"{user}:slots", f"{user}:tokens", f"{tag}:tier:slots", f"{tag}:tier:tokens"]


def _members(admission: Admission) -> list[str]:
    """The request's member in the user's slots and in the tier's."""
    return [admission.request_id, f"{admission.user_id}:{admission.request_id}"]


class Quotas:
    """Admits requests within their user's and tier's limits; one instance per gateway process."""

    def __init__(
        self,
        redis: RedisClient,
        tiers: Mapping[str, TierLimits],
        *,
        namespace: str,
        lease_s: float = LEASE_S,
        slot_retry_s: float = SLOT_RETRY_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        for name in (namespace, *tiers):
            if "{" in name or "}" in name:
                raise ValueError(f"{name!r}: namespace and tier names cannot contain braces (hash tags)")
        self._redis = redis
        self._tiers = dict(tiers)
        self._namespace = namespace
        self._lease_ms = math.ceil(lease_s * 1000)
        self._slot_retry_ms = math.ceil(slot_retry_s * 1000)
        self._timeout_s = timeout_s
        self._admit = redis.register_script(ADMIT)
        self._finish = redis.register_script(FINISH)
        self._renew = redis.register_script(RENEW)
        self._held: set[Admission] = set()
        self._renewer: asyncio.Task[None] | None = None

    async def admit(self, principal: Principal, request_id: str) -> Admission:
        """Take a slot for ``request_id`` (again: a no-op) or raise OverQuota; AuthError(403) for an
        unknown tier; Overloaded (503) when Redis cannot decide in time."""
        limits = self._tiers.get(principal.tier)
        if limits is None:
            raise AuthError(403, f"unknown tier {principal.tier!r}")
        admission = Admission(principal.user_id, principal.tier, request_id)
        if limits.unlimited:
            return admission
        args = [
            *_members(admission),
            limits.max_requests,
            limits.tokens_per_minute,
            limits.tier_max_requests,
            limits.tier_tokens_per_minute,
            self._lease_ms,
            self._slot_retry_ms,
        ]
        reply = await self._call(self._admit, admission, args)
        if not int(reply[0]):
            raise OverQuota(list(Limit)[int(reply[2]) - 1], int(reply[1]) / 1000)
        if limits.max_requests or limits.tier_max_requests:
            self._held.add(admission)
            self._start_renewer()
        return admission

    async def finish(self, admission: Admission, tokens: int) -> None:
        """Release the slot and debit ``tokens`` from the user's and the tier's minute. Never raises for
        Redis: on failure the slot lapses with its lease and the tokens go undebited (logged)."""
        self._held.discard(admission)
        limits = self._tiers[admission.tier]
        if limits.unlimited:
            return
        args = [*_members(admission), max(0, tokens), limits.tokens_per_minute, limits.tier_tokens_per_minute]
        try:
            await self._call(self._finish, admission, args)
        except Overloaded as exc:
            log.warning("quota finish of %s failed (%s): its slot lapses with its lease", admission, exc)

    async def close(self) -> None:
        """Stop renewing leases (shutdown): the slots of requests still running lapse ``lease_s`` later."""
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None

    async def _call(self, script: Any, admission: Admission, args: list[Any]) -> Any:
        keys = _keys(self._namespace, admission.tier, admission.user_id)
        try:
            async with asyncio.timeout(self._timeout_s):
                return await script(keys=keys, args=args)
        except (TimeoutError, OSError, redis.RedisError) as exc:
            raise Overloaded(self._timeout_s, UNANSWERED) from exc

    def _start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_leases(), name="gateway-quota-renewer")

    async def _renew_leases(self) -> None:
        """Every lease_s / 3 while requests are held: one RENEW per user and one per tier; ends when idle."""
        while self._held:
            await asyncio.sleep(self._lease_ms / 3000)
            by_key: dict[str, list[str]] = {}
            for admission in list(self._held):
                keys, members = _keys(self._namespace, admission.tier, admission.user_id), _members(admission)
                by_key.setdefault(keys[0], []).append(members[0])
                by_key.setdefault(keys[2], []).append(members[1])
            results = await asyncio.gather(
                *(self._renew(keys=[key], args=[self._lease_ms, *ids]) for key, ids in by_key.items()),
                return_exceptions=True,
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                log.warning("could not renew %d of %d lease sets: %r", len(failed), len(by_key), failed[0])
