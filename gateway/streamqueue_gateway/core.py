"""The gateway's state and its admission pipeline, shared by the OpenAI, SSE and WebSocket routes.

Every request goes the same way: auth -> model lookup -> body validation -> backpressure -> quota
admit; then the route sends and streams; then ``finish`` releases the quota slot and debits the
tokens, always (also on error, disconnect and cancellation: it is shielded).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from streamqueue import Client
from streamqueue.client import Reply, ReplyError, RequestCancelled, RequestExpired
from streamqueue.connection import RedisClient, cluster_ready, connect_any

from . import metrics as m
from .auth import Authenticator, AuthError, Principal
from .backpressure import Backlog, Overloaded
from .chat import ChatRequest, model_name, parse_chat
from .config import GatewayConfig, ModelConfig
from .errors import ApiError
from .grace import Watches
from .metrics import GatewayMetrics
from .ownership import Ownership, new_request_id
from .quotas import Admission, OverQuota, Quotas

log = logging.getLogger(__name__)
CHARS_PER_TOKEN = 4  # the estimate when the model reports no usage (as the model handler's)
REDIS_POOL_WAIT_S = 10.0  # the quota calls' own timeout (2 s) ends a longer wait first


@dataclass
class Queue:
    """One model's streamqueue as the gateway uses it.

    Two clients: ``client`` sends requests and streams replies to callers; ``follower`` follows each
    browser request to its final entry (for the quota), beside any event stream of the same request
    on this replica: a client awaits each request id once.
    """

    config: ModelConfig
    client: Client
    follower: Client
    backlog: Backlog


@dataclass
class Ticket:
    """A request: who, which queue, what was asked, its quota admission (None until admitted, and if
    refused), and what it has used so far."""

    principal: Principal
    queue: Queue
    chat: ChatRequest
    request_id: str
    admission: Admission | None = None
    admitting: asyncio.Task[None] | None = field(default=None, repr=False)  # see Gateway.admitting
    started: float = field(default_factory=time.monotonic)
    first_chunk: float | None = None
    reply_chars: int = 0
    final: Reply | None = None
    outcome: str = m.ERROR

    def usage(self) -> dict[str, int]:
        """The model's reported usage, else an estimate from the characters (a quarter each)."""
        reported = self.final.usage if self.final is not None else None
        if reported is not None and all(isinstance(reported.get(k), int) for k in _USAGE_KEYS):
            return {k: int(reported[k]) for k in _USAGE_KEYS}
        prompt = math.ceil(self.chat.prompt_chars / CHARS_PER_TOKEN)
        completion = math.ceil(self.reply_chars / CHARS_PER_TOKEN)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


class Gateway:
    """What the routes share: config, auth, quotas, the queues' clients, ownership, grace, metrics."""

    def __init__(self, config: GatewayConfig, redis: RedisClient, queues: dict[str, Queue]) -> None:
        self.config = config
        self.redis = redis  # the gateway's own keys: quotas, ownership, watch keys
        self.queues = queues
        self.authenticator = Authenticator(config.auth)
        self.quotas = Quotas(redis, config.tiers, namespace=config.namespace)
        self.ownership = Ownership(redis, config.namespace, config.request_ttl_seconds)
        grace, ttl = config.resume_grace_seconds, config.request_ttl_seconds
        self.watches = Watches(redis, config.namespace, grace, ttl)
        self.metrics = GatewayMetrics()
        self.tasks: set[asyncio.Task[Any]] = set()  # browser requests followed to their end
        self.stopping = False  # set on SIGTERM: /readyz fails so no new traffic comes (app.serve)

    @classmethod
    def open(cls, config: GatewayConfig) -> Gateway:
        """Build the clients (lazy: no I/O until the first request)."""
        connection = config.redis.connection()
        # Every request in flight may run a quota script at once: wait for a free connection.
        redis = connect_any(connection, pool_wait_s=REDIS_POOL_WAIT_S)
        queues = {}
        for model in config.models:
            kwargs: dict[str, Any] = {
                "stream": model.stream,
                "partitions": model.partitions,
                "reply_prefix": model.reply_prefix,
                "max_message_bytes": model.max_message_bytes,
            }
            backlog = Backlog(
                redis, model.stream, model.partitions, model.group, model.max_backlog,
                config.backlog_refresh_seconds,
            )  # fmt: skip
            clients = Client(connection, **kwargs), Client(connection, **kwargs)
            queues[model.name] = Queue(model, *clients, backlog)
        return cls(config, redis, queues)

    async def connect(self) -> None:
        """Before serving: each Redis Cluster client learns its slot map (waiting while the cluster is
        unreachable), since redis-py's fails some of many first commands sent at once otherwise; a
        no-op for one server, whose clients connect lazily."""

        def unreachable(exc: Exception, delay: float) -> None:
            log.warning("Redis Cluster unreachable (%s); retrying in %.2f s", exc, delay)

        clients = [self.redis]
        for queue in self.queues.values():
            clients += [queue.client.redis, queue.follower.redis]
        await asyncio.gather(*(cluster_ready(client, unreachable) for client in clients))

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)  # each finishes its quota
        await self.watches.close()
        await self.quotas.close()
        for queue in self.queues.values():
            await queue.client.close()
            await queue.follower.close()
        await self.redis.aclose()

    def principal(self, request: web.Request, *, query_token: bool = False) -> Principal:
        """The caller, from ``Authorization: Bearer`` (or ``?access_token=`` where browsers need it)."""
        token = _bearer(request.headers.get("Authorization"))
        if token is None and query_token:
            token = request.query.get("access_token") or None
        try:
            return self.authenticator.authenticate(token)
        except AuthError as exc:
            self.metrics.rejected.labels("", m.REJECTED_AUTH).inc()
            raise _auth_error(exc) from None

    def ticket(self, principal: Principal, body: Any) -> Ticket:
        """Model lookup and validation (``ApiError`` 404/400); not admitted yet (``admit_ticket``)."""
        name = model_name(body)
        queue = self.queues.get(name)
        if queue is None:
            raise ApiError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return Ticket(principal, queue, parse_chat(body), new_request_id())

    async def admit(self, principal: Principal, body: Any) -> Ticket:
        """``ticket`` and ``admit_ticket``: ``ApiError`` (404/400/503/429/403) if refused."""
        ticket = self.ticket(principal, body)
        await self.admit_ticket(ticket)
        return ticket

    def admitting(self, ticket: Ticket) -> asyncio.Task[None]:
        """``admit_ticket`` as a task, for a caller that overlaps it with other waits (the reply
        reader's position: ``Client.request_stream(send_after=...)``); ``finish`` waits for it."""
        ticket.admitting = asyncio.create_task(self.admit_ticket(ticket), name="gateway-admit")
        return ticket.admitting

    async def admit_ticket(self, ticket: Ticket) -> None:
        """Backpressure and quota; sets ``ticket.admission``; ``ApiError`` (503/429/403) if refused."""
        tier = ticket.principal.tier
        try:
            await ticket.queue.backlog.check()
            ticket.admission = await self.quotas.admit(ticket.principal, ticket.request_id)
        except Overloaded as exc:
            self.metrics.rejected.labels(tier, exc.reason).inc()
            raise ApiError(
                503, f"the queue is overloaded ({exc.reason}); retry later", type="server_error",
                code="overloaded", retry_after_s=exc.retry_after_s,
            ) from None  # fmt: skip
        except OverQuota as exc:
            self.metrics.rejected.labels(tier, exc.limit).inc()
            raise ApiError(
                429, f"quota exceeded: {exc.limit}", type="rate_limit_error", code=exc.limit,
                retry_after_s=exc.retry_after_s,
            ) from None  # fmt: skip
        except AuthError as exc:  # a tier the gateway has no limits for
            self.metrics.rejected.labels(tier, m.REJECTED_TIER).inc()
            raise _auth_error(exc) from None

    async def finish(self, ticket: Ticket) -> None:
        """Release the slot, debit the tokens, count the outcome; shielded from the caller's cancellation."""
        await asyncio.shield(self._finish(ticket))

    async def _finish(self, ticket: Ticket) -> None:
        if ticket.admitting is not None:  # its outcome was the caller's answer already, if it failed
            await asyncio.gather(ticket.admitting, return_exceptions=True)
        if ticket.admission is None:
            return  # refused: nothing was queued, counted or held
        tokens = ticket.usage()["total_tokens"]
        tier = ticket.principal.tier
        self.metrics.requests.labels(ticket.queue.config.name, tier, ticket.outcome).inc()
        self.metrics.tokens.labels(tier).inc(tokens)
        await self.quotas.finish(ticket.admission, tokens)

    async def cancel(self, ticket: Ticket) -> None:
        """Cancel the request on the queue (its model call stops); shielded, and never raises."""
        try:
            await asyncio.shield(ticket.queue.client.cancel(ticket.principal.user_id, ticket.request_id))
        except Exception as exc:
            log.warning("cancel of request %s failed: %s", ticket.request_id, exc)

    def first_chunk(self, ticket: Ticket) -> None:
        """Record the time to the first chunk (admission to the first write to the caller)."""
        if ticket.first_chunk is None:
            ticket.first_chunk = time.monotonic()
            labels = self.metrics.ttft.labels(ticket.queue.config.name, ticket.principal.tier)
            labels.observe(ticket.first_chunk - ticket.started)


GATEWAY = web.AppKey("gateway", Gateway)


def outcome_error(exc: BaseException, ticket: Ticket) -> ApiError:
    """The caller's error for a request that failed on the queue, and the ticket's outcome."""
    ticket.outcome, error = queue_error(exc)
    return error


def queue_error(exc: BaseException) -> tuple[str, ApiError]:
    """The outcome (metrics label) and the caller's error for a request that failed on the queue: the
    same on every route (OpenAI, WebSocket, browser events)."""
    if isinstance(exc, RequestCancelled):
        return m.CANCELLED, ApiError(409, "the request was cancelled", code="cancelled")
    if isinstance(exc, RequestExpired):
        expired = "the request expired in the queue"
        return m.EXPIRED, ApiError(503, expired, type="server_error", code="expired", retry_after_s=5)
    if isinstance(exc, TimeoutError):
        return m.TIMEOUT, ApiError(
            504, "no reply from the model in time", type="server_error", code="timeout"
        )
    detail = exc.reply.error if isinstance(exc, ReplyError) else str(exc)
    return m.ERROR, ApiError(502, f"the model failed: {detail}", type="server_error", code="model_error")


QUEUE_ERRORS = (ReplyError, TimeoutError)


def _bearer(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _auth_error(exc: AuthError) -> ApiError:
    if exc.status == 401:
        return ApiError(401, str(exc), type="authentication_error", code="invalid_api_key")
    if exc.status == 403:
        return ApiError(403, str(exc), type="permission_error", code="forbidden")
    # The credentials cannot be read (a Secret being rotated): fail closed, retry soon.
    return ApiError(exc.status, str(exc), type="server_error", code="unavailable", retry_after_s=1)
