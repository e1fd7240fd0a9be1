"""The HTTP handler: POST each message to a service and reply with the response body.

For AI backends that already speak HTTP, so the worker image needs no user code. The request body is
JSON (``id``, ``user_id``, ``message``, ``request_id``, ``deliveries``, ``fields``); the reply is the
body as text. Timeouts, connection errors, 429 and 5xx are retried with backoff; other statuses fail
at once (retrying a 400 cannot help). A failure leaves the entry pending, so the worker's delivery
limit still applies on top of these in-process retries.

Limits (docs/ai.md, "Model-API limits"): each POST is one ``ModelLimits`` call, so the queue's
requests-per-minute and concurrent-calls limits hold; a 429 pauses every worker of the queue for its
``Retry-After`` (else the backoff). No tokens are reported (the body is the service's own), so a
tokens-per-minute limit only ever sees zero-token calls here. The connection pool holds
``model_concurrent_calls`` (else the worker's ``concurrency``) connections.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import aiohttp
from redis.backoff import ExponentialBackoff

from ..limits import Call, ModelLimits, Retryable, back_off, retry_after_seconds
from . import HandlerFactory, Message
from .pool import Pool

if TYPE_CHECKING:
    from ..settings import WorkerSettings

log = logging.getLogger(__name__)
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 5.0
_BACKOFF = ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S)  # redis-py's, no jitter


class HttpHandlerError(RuntimeError):
    """The service answered with an error, or could not be reached after every retry."""


class HttpHandler:
    """POSTs messages to ``url`` over one shared connection pool."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        retries: int,
        limits: ModelLimits | None = None,
        connections: int = 100,
    ) -> None:
        self.url = url
        self.retries = retries
        self.limits = limits
        self.pool = Pool(connections, aiohttp.ClientTimeout(total=timeout_s))

    async def __call__(self, msg: Message) -> str:
        body = _request_body(msg)
        for attempt in range(self.retries + 1):
            try:
                async with Call(self.limits):
                    return await self._post(body)
            except Retryable as exc:
                if attempt == self.retries:
                    raise HttpHandlerError(f"{self.url}: {exc} (after {attempt + 1} attempts)") from exc
                delay = exc.retry_after if exc.retry_after is not None else _BACKOFF.compute(attempt)
                await back_off(self.limits, exc, delay, f"POST {self.url}", attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _post(self, body: dict[str, Any]) -> str:
        async with self.pool.post(self.url, body) as response:
            text = await response.text()
            if response.status == 429:
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                raise Retryable("HTTP 429", retry_after, rate_limited=True)
            if response.status >= 500:
                raise Retryable(f"HTTP {response.status}")
            if response.status >= 400:
                raise HttpHandlerError(f"{self.url}: HTTP {response.status}: {text[:200]}")
            return text

    async def aclose(self) -> None:
        await self.pool.aclose()
        if self.limits is not None:
            await self.limits.aclose()


def _request_body(msg: Message) -> dict[str, Any]:
    return {
        "id": msg.id,
        "user_id": msg.user_id,
        "message": msg.message,
        "request_id": msg.request_id,
        "deliveries": msg.deliveries,
        "fields": dict(msg.fields),
    }


def _build(settings: WorkerSettings) -> HttpHandler:
    if not settings.handler_url:
        raise ValueError("the HTTP handler needs STREAMQUEUE_HANDLER_URL (--handler-url)")
    return HttpHandler(
        settings.handler_url,
        timeout_s=settings.handler_timeout_seconds,
        retries=settings.handler_retries,
        limits=ModelLimits.from_settings(settings),
        connections=settings.model_concurrent_calls or settings.concurrency,
    )


handle = HandlerFactory(_build)
