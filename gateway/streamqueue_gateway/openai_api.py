"""``POST /v1/chat/completions`` (streamed and not) and ``GET /v1/models``, in OpenAI's wire format,
so the ``openai`` SDK and curl work unchanged against the gateway.

A streamed reply starts (status 200, ``text/event-stream``) with its first chunk, so a request that
fails before any text (expired, the model failed, no reply in time) still gets a proper error status;
a failure after that is an event ``data: {"error": {...}}``, which the SDK raises as ``APIError``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web
from streamqueue.client import Chunk

from . import metrics as m
from .core import GATEWAY, QUEUE_ERRORS, Gateway, Ticket, outcome_error
from .errors import ApiError
from .relay import open_stream, relay

_OWNER = "streamqueue"
_DONE = b"data: [DONE]\n\n"


async def read_json(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise ApiError(400, "the body is not valid JSON") from None


async def models(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    gateway.principal(request)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": _OWNER} for name in gateway.queues]
    return web.json_response({"object": "list", "data": data})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    principal = gateway.principal(request)
    ticket = gateway.ticket(principal, await read_json(request))
    try:
        if ticket.chat.stream:
            return await _stream(request, gateway, ticket)
        await gateway.admit_ticket(ticket)
        return await _complete(gateway, ticket)
    finally:
        await gateway.finish(ticket)


async def _complete(gateway: Gateway, ticket: Ticket) -> web.Response:
    """The whole reply as one ``chat.completion`` object."""
    try:
        reply = await ticket.queue.client.request(
            ticket.principal.user_id, ticket.chat.message, request_id=ticket.request_id,
            chat=ticket.chat.chat, timeout=gateway.config.request_timeout_seconds,
            deadline=gateway.config.request_timeout_seconds,
        )  # fmt: skip
    except (asyncio.CancelledError, ConnectionError):  # the caller left: counted as relay counts it
        ticket.outcome = m.DISCONNECTED
        await gateway.cancel(ticket)
        raise
    except QUEUE_ERRORS as exc:  # timed out, or the queue failed it
        if isinstance(exc, TimeoutError):
            await gateway.cancel(ticket)
        raise outcome_error(exc, ticket) from None
    except BaseException:  # anything else: the request must not run on with nobody to answer
        await gateway.cancel(ticket)
        raise
    gateway.first_chunk(ticket)
    ticket.final, ticket.reply_chars, ticket.outcome = reply, len(reply.response or ""), m.OK
    message = {"role": "assistant", "content": reply.response or ""}
    body = _envelope(ticket, "chat.completion")
    body["choices"] = [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}]
    body["usage"] = ticket.usage()
    return web.json_response(body)


async def _stream(request: web.Request, gateway: Gateway, ticket: Ticket) -> web.StreamResponse:
    """``chat.completion.chunk`` events, then (with ``stream_options.include_usage``) the usage, then
    ``data: [DONE]``."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    envelope = json.dumps(_envelope(ticket, "chat.completion.chunk"))[:-1]
    usage_null = ',"usage":null' if ticket.chat.include_usage else ""
    head = f'data: {envelope}{usage_null},"choices":[{{"index":0,"delta":{{"content":'.encode()
    tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'

    async def write(chunk: Chunk) -> None:
        event = head + json.dumps(chunk).encode() + tail
        if not response.prepared:  # the role comes first, in the same socket send
            await response.prepare(request)
            event = head[:-10] + b'"role":"assistant","content":""' + tail + event
        await response.write(event)

    try:
        # The admission decides while the reply reader takes its position: one round trip less.
        await relay(gateway, ticket, open_stream(gateway, ticket, admitting=gateway.admitting(ticket)), write)
    except ApiError as exc:
        if not response.prepared:
            raise
        await response.write(b"data: " + json.dumps(exc.body()).encode() + b"\n\n")
        return response
    if not response.prepared:  # an empty reply
        await response.prepare(request)
    end = _event(ticket, {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"})
    if ticket.chat.include_usage:
        end += _event(ticket, None)
    await response.write_eof(end + _DONE)  # one socket send for the reply's last events and its end
    return response


def _envelope(ticket: Ticket, kind: str) -> dict[str, Any]:
    """The fields every completion object carries; ``created`` is the admission time."""
    created = int(time.time() - (time.monotonic() - ticket.started))
    model = ticket.chat.model
    return {"id": f"chatcmpl-{ticket.request_id}", "object": kind, "created": created, "model": model}


def _event(ticket: Ticket, choice: dict[str, Any] | None) -> bytes:
    """A chunk with one choice, or (``None``) the usage chunk, whose choices are empty."""
    event = _envelope(ticket, "chat.completion.chunk")
    event["choices"] = [choice] if choice is not None else []
    if ticket.chat.include_usage:
        event["usage"] = ticket.usage() if choice is None else None
    return b"data: " + json.dumps(event).encode() + b"\n\n"
