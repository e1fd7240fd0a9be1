"""The model handler: stream a chat completion from an OpenAI-compatible server into the reply stream.

``STREAMQUEUE_HANDLER=streamqueue.handlers.openai:handle`` with ``STREAMQUEUE_OPENAI_BASE_URL`` (vLLM,
llama.cpp's server, Ollama, TGI and hosted APIs all serve ``POST <base>/chat/completions``). Each
message becomes ``[system prompt, remembered exchanges..., the message]``; an entry with a ``chat``
field (``wire.CHAT``, written by the gateway) becomes ``[system prompt, chat's messages...]`` with the
chat's sampling parameters (``wire.CHAT_PARAMS``; ``max_tokens`` capped by the handler's own): the
conversation is the caller's, so memory is neither mixed in nor stored for it. The reply is requested with
``stream: true`` and every ``choices[0].delta.content`` of the server-sent events is yielded as one
chunk, so the worker writes it to the user's reply stream at once (the final entry carries the whole
text, as for every streaming handler).

Errors, mapped onto the worker's retry and dead-letter rules:

- 429: pause every worker of the queue for ``Retry-After`` (seconds or an HTTP date; capped at
  ``limits.RETRY_AFTER_CAP_S``), or the backoff when the header is missing, then retry
  (``ModelLimits.pause``; a handler built without limits waits alone);
- 5xx, timeouts (connection, first token, between tokens) and connection errors: retry with backoff
  (``redis.backoff.ExponentialBackoff``, as the HTTP handler);
- 400 "context length exceeded" (``ModelContextTooLong``) and every other 4xx (``ModelRequestError``):
  no retry in process, a clear reason; the entry stays pending, is redelivered, and is dead-lettered
  with that reason once it has failed ``max_deliveries`` times.

Limits (docs/ai.md, "Model-API limits"): every attempt is one ``ModelLimits`` call, so it starts only
when the queue's requests-per-minute, tokens-per-minute and concurrent-calls limits allow. The request
asks for ``stream_options.include_usage``; the tokens reported are the final event's
``usage.total_tokens``, or, from a server that sends no usage, an estimate: a quarter of the prompt's
characters plus one per streamed chunk. An attempt the server refused (any 4xx/5xx) counts no tokens.
A reported usage object is also written on the final reply entry (``wire.USAGE``), for the gateway.
The HTTP connection pool holds ``model_concurrent_calls`` (else the worker's ``concurrency``)
connections, so it is not a hidden, lower cap.

Retries happen only before the first chunk was written: once the user has seen part of a reply a new
attempt would produce a different text, so a failure mid-stream fails the delivery
(``ModelStreamBroken``) and the worker's redelivery starts the reply over from chunk 0.

Memory (``openai_memory_turns`` > 0): the last N exchanges of each user are kept in the list
``<stream>:memory:<user_id>`` (``wire.memory_key``: one JSON ``{"user", "assistant"}`` item per
exchange, trimmed to N, expiring ``openai_memory_ttl_seconds`` after the last exchange), on the
worker's Redis (a single server or a cluster), and sent before the new message. An exchange is
stored when its reply is complete, before the worker commits the reply; a delivery that fails after
that (rare: the commit itself failed) may store an exchange twice.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from redis.backoff import ExponentialBackoff

from .. import tracing
from ..limits import Call, ModelLimits, Retryable, back_off, retry_after_seconds
from ..wire import CHAT, CHAT_PARAMS, USAGE, memory_key
from . import HandlerFactory, Message
from .pool import Pool

if TYPE_CHECKING:
    from ..connection import RedisClient
    from ..settings import WorkerSettings

log = logging.getLogger(__name__)
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 10.0
CHARS_PER_TOKEN = 4  # the estimate for servers that report no usage
_BACKOFF = ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S)
# How servers say "the prompt does not fit": OpenAI and llama-cpp-python's code, vLLM's and others' text.
_CONTEXT_MARKERS = ("context_length_exceeded", "maximum context length", "context length", "exceed_context")


class ModelError(RuntimeError):
    """The model API failed this request; the message says why."""


class ModelRequestError(ModelError):
    """The API refused the request (4xx other than 429): retrying the same request cannot help."""


class ModelContextTooLong(ModelRequestError):
    """The prompt (system prompt + memory + message) plus max_tokens exceeds the model's context."""


class ModelStreamBroken(ModelError):
    """The reply stream broke after chunks were written; the delivery fails and starts over."""


class _Usage:
    """What one attempt used: the server's count when it sends one, else an estimate."""

    def __init__(self, prompt_chars: int) -> None:
        self.prompt_chars = prompt_chars
        self.answered = False  # the server accepted the request (2xx)
        self.reported: dict[str, Any] | None = None  # the usage object of the final event
        self.chunks = 0

    def tokens(self) -> int:
        if not self.answered:
            return 0
        if self.reported is not None:
            return int(self.reported["total_tokens"])
        return math.ceil(self.prompt_chars / CHARS_PER_TOKEN) + self.chunks


class OpenAIHandler:
    """Streams chat completions over one shared connection pool; ``aclose`` releases it."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        system_prompt: str | None = None,
        max_tokens: int | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        memory: Memory | None = None,
        limits: ModelLimits | None = None,
        connections: int = 100,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        self.retries = retries
        self.memory = memory
        self.limits = limits
        headers = {"Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # No total: a long answer may stream for minutes; each wait (connect, next bytes) is bounded.
        timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s)
        self.pool = Pool(connections, timeout, headers)

    async def __call__(self, msg: Message) -> AsyncIterator[str]:
        chat = _chat(msg)
        memory = self.memory if chat is None else None  # a chat carries its own history
        history = await memory.load(msg.user_id) if memory is not None else []
        body = self.request_body(msg.message, history, chat)
        prompt_chars = sum(_content_chars(m.get("content")) for m in body["messages"])
        parts: list[str] = []
        for attempt in range(self.retries + 1):
            try:
                async with Call(self.limits) as call:
                    usage = _Usage(prompt_chars)
                    span = tracing.start_span("model call", {"server.address": self.url, "attempt": attempt})
                    try:
                        async for chunk in self._stream(body, usage):
                            if span is not None and not parts:
                                span.add_event(tracing.FIRST_TOKEN)
                            parts.append(chunk)
                            yield chunk
                    except BaseException as exc:
                        if span is not None:
                            tracing.record_failure(span, exc)
                        raise
                    finally:
                        call.report_tokens(usage.tokens())
                        if usage.reported is not None:
                            msg.final_fields[USAGE] = json.dumps(usage.reported)
                        if span is not None:
                            span.set_attribute("gen_ai.usage.total_tokens", usage.tokens())
                            span.end()
                break
            except Retryable as exc:
                if parts:
                    raise ModelStreamBroken(
                        f"{self.url}: {exc} after {len(parts)} chunks; the reply starts over on redelivery"
                    ) from exc
                if attempt == self.retries:
                    raise ModelError(f"{self.url}: {exc} (after {attempt + 1} attempts)") from exc
                delay = exc.retry_after if exc.retry_after is not None else _BACKOFF.compute(attempt)
                await back_off(self.limits, exc, delay, "model API", attempt)
        if memory is not None:
            await memory.remember(msg.user_id, msg.message, "".join(parts))

    def request_body(
        self, message: str, history: list[dict[str, str]], chat: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The server's request: the system prompt first, then ``chat``'s messages and sampling
        parameters when the entry has a chat, else the remembered ``history`` and ``message``."""
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        if chat is not None:
            messages += chat["messages"]
        else:
            for exchange in history:
                messages.append({"role": "user", "content": exchange["user"]})
                messages.append({"role": "assistant", "content": exchange["assistant"]})
            messages.append({"role": "user", "content": message})
        body: dict[str, Any] = {
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},  # the tokens to report to the TPM limit
        }
        if chat is not None:
            body.update((name, chat[name]) for name in CHAT_PARAMS if chat.get(name) is not None)
        if self.model:
            body["model"] = self.model
        if self.max_tokens is not None:
            body["max_tokens"] = min(int(body.get("max_tokens", self.max_tokens)), self.max_tokens)
        return body

    async def _stream(self, body: dict[str, Any], usage: _Usage) -> AsyncIterator[str]:
        """One attempt: yield the content deltas; raise ``Retryable`` or a ``ModelRequestError``."""
        async with self.pool.post(self.url, body) as response:
            if response.status >= 400:
                raise _status_error(response.status, await response.text(), response.headers)
            usage.answered = True
            tail = b""
            # Whatever arrived, at once (one await per network read, not per line: a line
            # through aiohttp's readline costs several times more than the split here).
            async for block in response.content.iter_any():
                lines = (tail + block).split(b"\n")
                tail = lines.pop()
                for raw in lines:
                    event = _sse_data(raw)
                    if event is None:
                        continue
                    if event == "[DONE]":
                        return
                    content, tokens = _event_parts(event)
                    if tokens is not None:
                        usage.reported = tokens
                    if content:
                        usage.chunks += 1
                        yield content
            if _sse_data(tail) != "[DONE]":  # a last line without its newline still counts
                raise Retryable("the event stream ended without data: [DONE]")

    async def aclose(self) -> None:
        await self.pool.aclose()
        if self.memory is not None:
            await self.memory.aclose()
        if self.limits is not None:
            await self.limits.aclose()


@dataclass
class Memory:
    """The last ``turns`` exchanges per user, in a Redis list with an idle TTL."""

    redis: RedisClient
    stream: str
    turns: int
    ttl_s: int

    def key(self, user_id: str) -> str:
        return memory_key(self.stream, user_id)

    async def load(self, user_id: str) -> list[dict[str, str]]:
        items = await self.redis.lrange(self.key(user_id), -self.turns, -1)
        exchanges = []
        for item in items:
            try:
                exchange = json.loads(item)
            except ValueError:
                continue  # written by someone else: ignore rather than fail every request of this user
            if isinstance(exchange, dict) and {"user", "assistant"} <= exchange.keys():
                exchanges.append(exchange)
        return exchanges

    async def remember(self, user_id: str, message: str, reply: str) -> None:
        key = self.key(user_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, json.dumps({"user": message, "assistant": reply}))
            pipe.ltrim(key, -self.turns, -1)
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def aclose(self) -> None:
        await self.redis.aclose()


def _status_error(status: int, text: str, headers: Any) -> Exception:
    detail = _error_message(text)
    if status == 429:
        return Retryable(
            f"HTTP 429: {detail}", retry_after_seconds(headers.get("Retry-After")), rate_limited=True
        )
    if status >= 500:
        return Retryable(f"HTTP {status}: {detail}")
    lowered = text.lower()
    if status in (400, 413) and any(marker in lowered for marker in _CONTEXT_MARKERS):
        return ModelContextTooLong(f"context length exceeded (HTTP {status}): {detail}")
    return ModelRequestError(f"model API refused the request (HTTP {status}): {detail}")


def _error_message(text: str) -> str:
    """The API's own words: ``error.message`` of an OpenAI error body, else the body's start."""
    try:
        body = json.loads(text)
    except ValueError:
        return text[:300]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])[:500]
    if isinstance(error, str):
        return error[:500]
    return text[:300]


def _sse_data(raw: bytes) -> str | None:
    """The payload of a ``data:`` line; None for blank lines, comments and other SSE fields."""
    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    if not line.startswith("data:"):
        return None
    return line[5:].removeprefix(" ")


def _chat(msg: Message) -> dict[str, Any] | None:
    """The entry's chat request (validated by the worker: an object with a messages list), if any."""
    raw = msg.fields.get(CHAT)
    return None if raw is None else dict(json.loads(raw))


def _content_chars(content: Any) -> int:
    """Characters of a message's content: a string, or a list of parts whose ``text`` counts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part["text"]) for part in content if isinstance(part, dict) and "text" in part)
    return 0


def _event_parts(event: str) -> tuple[str | None, dict[str, Any] | None]:
    """An event's content delta and its usage object (the last event of include_usage), if valid."""
    try:
        data = orjson.loads(event)  # per token: several times quicker than json's
    except ValueError as exc:
        raise Retryable(f"unreadable event {event[:100]!r}") from exc
    if not isinstance(data, dict):
        return None, None
    if "error" in data:  # some servers report a failure mid-stream as an event
        raise Retryable(f"error event: {_error_message(event)}")
    usage = data.get("usage")
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    valid = isinstance(total, int) and not isinstance(total, bool) and total >= 0
    tokens = usage if valid and isinstance(usage, dict) else None
    choices = data.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return None, tokens  # e.g. the usage-only event of stream_options.include_usage
    delta = choices[0].get("delta") or {}
    content = delta.get("content") if isinstance(delta, dict) else None
    return (content if isinstance(content, str) else None), tokens


def _build(settings: WorkerSettings) -> OpenAIHandler:
    if not settings.openai_base_url:
        raise ValueError("the model handler needs STREAMQUEUE_OPENAI_BASE_URL (--openai-base-url)")
    memory = None
    if settings.openai_memory_turns > 0:
        from ..connection import connect_any

        memory = Memory(
            connect_any(settings.redis_connection()),  # one server or a cluster, as the worker's own
            settings.stream,
            settings.openai_memory_turns,
            settings.openai_memory_ttl_seconds,
        )
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    return OpenAIHandler(
        settings.openai_base_url,
        model=settings.openai_model,
        api_key=key,
        system_prompt=settings.openai_system_prompt,
        max_tokens=settings.openai_max_tokens,
        timeout_s=settings.openai_timeout_seconds,
        retries=settings.openai_retries,
        memory=memory,
        limits=ModelLimits.from_settings(settings),
        connections=settings.model_concurrent_calls or settings.concurrency,
    )


handle = HandlerFactory(_build)
