"""Which user a browser request id belongs to: bound at creation, checked on every resume and cancel.

A request id is the only handle a browser keeps, and it travels in URLs; without this binding anyone
who learns one could read another user's reply. The record (a Redis key with a TTL, so any replica can
check it) also holds the model and the reply-stream position before the request was sent, where its
first event stream starts reading. Unknown, expired and someone else's ids all get the same 404.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from streamqueue.connection import RedisClient

from .errors import not_found

_REQUEST_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Owned:
    """A bound request: its user, model and where its replies start (a reply-stream entry id)."""

    user_id: str
    model: str
    start: str


def new_request_id() -> str:
    return uuid.uuid4().hex


class Ownership:
    """Request-id records in Redis (``<namespace>:request:<id>``), expiring ``ttl_s`` after creation."""

    def __init__(self, redis: RedisClient, namespace: str, ttl_s: int) -> None:
        self._redis = redis
        self._namespace = namespace
        self._ttl_s = ttl_s

    def key(self, request_id: str) -> str:
        return f"{self._namespace}:request:{request_id}"

    async def bind(self, request_id: str, owned: Owned) -> None:
        record = json.dumps({"user": owned.user_id, "model": owned.model, "start": owned.start})
        if not await self._redis.set(self.key(request_id), record, ex=self._ttl_s, nx=True):
            raise RuntimeError(f"request id {request_id} is taken")  # a uuid4 collision: never in practice

    async def lookup(self, user_id: str, request_id: str) -> Owned:
        """The caller's own request, else ``ApiError`` 404 (the same for unknown and not theirs)."""
        if not _REQUEST_ID.fullmatch(request_id):
            raise not_found()
        raw = await self._redis.get(self.key(request_id))
        if raw is None:
            raise not_found()
        record = json.loads(raw)
        if record.get("user") != user_id:
            raise not_found()
        return Owned(user_id, str(record["model"]), str(record["start"]))
