"""Relay one admitted request's reply stream to whoever waits for it, counting what it used.

Shared by the OpenAI stream, the WebSocket and the follower of browser requests, so all three count
time to first chunk, characters, active streams and outcomes alike. Disconnect = cancel: when the
caller goes away (the route's task is cancelled, or a write fails) the request is cancelled on the
queue, so the worker's model call stops; a reply that takes longer than ``requestTimeoutSeconds``
between chunks is cancelled too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from streamqueue.client import Chunk, ReplyStream

from . import metrics as m
from .core import QUEUE_ERRORS, Gateway, Ticket, outcome_error


def open_stream(gateway: Gateway, ticket: Ticket, *, admitting: Awaitable[None] | None = None) -> ReplyStream:
    """Send the request and stream its reply (the queue's deadline is the request timeout: a request
    the gateway has given up on is not worth running). ``admitting``: the ticket's admission, still
    deciding; the request is sent once it has admitted it (its ``ApiError`` if refused comes out of
    the stream), while the reply reader takes its position meanwhile."""
    timeout = gateway.config.request_timeout_seconds
    return ticket.queue.client.request_stream(
        ticket.principal.user_id, ticket.chat.message, request_id=ticket.request_id,
        chat=ticket.chat.chat, timeout=timeout, deadline=timeout, send_after=admitting,
    )  # fmt: skip


async def relay(
    gateway: Gateway,
    ticket: Ticket,
    stream: ReplyStream,
    write: Callable[[Chunk], Awaitable[None]] | None,
    *,
    cancel_on_disconnect: bool = True,
) -> None:
    """Pass each chunk to ``write``; sets the ticket's final entry and outcome. Raises ``ApiError`` when
    the queue failed the request; re-raises cancellation and write errors (after cancelling)."""
    gauge = gateway.metrics.active_streams.labels(ticket.principal.tier)
    gauge.inc()
    try:
        async for chunk in stream:
            gateway.first_chunk(ticket)
            ticket.reply_chars += len(chunk)
            if write is not None:
                await write(chunk)
        ticket.final = stream.final
        ticket.outcome = m.OK
    except (asyncio.CancelledError, ConnectionError):
        ticket.outcome = m.DISCONNECTED
        if cancel_on_disconnect:
            await gateway.cancel(ticket)
        raise
    except QUEUE_ERRORS as exc:
        error = outcome_error(exc, ticket)
        if isinstance(exc, TimeoutError):
            await gateway.cancel(ticket)
        raise error from None
    finally:
        gauge.dec()
        await stream.aclose()
