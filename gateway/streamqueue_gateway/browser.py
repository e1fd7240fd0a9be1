"""Browser endpoints: create a request, follow its reply as server-sent events (resumable), cancel it.

    POST   /v1/requests                {chat body}  -> 202 {"id", "events"}
    GET    /v1/requests/{id}/events    text/event-stream: one event per chunk, ``id:`` = its entry id
    DELETE /v1/requests/{id}           -> 204

``EventSource`` cannot send headers, so these also take ``?access_token=``. Each chunk event's data is
the chunk as a JSON string; the last event is ``event: done`` (data: ``{"usage": ...}``) or ``event:
error`` (data: OpenAI's error object). A reconnecting EventSource sends ``Last-Event-ID``, and the
stream resumes right after that entry (``Client.request_stream(after=...)``), on any replica: every
chunk exactly once, in order. Close the EventSource on ``done``, or it reconnects (and gets ``done``
again). The stream's first block is ``retry:`` (``sseRetrySeconds``, 1 s; browsers' own default is
about 3 s), the delay before EventSource reconnects. The replica that took the POST follows the request
to its end for the quota (``follow``); a stream that drops is cancelled only if not resumed within
``resumeGraceSeconds`` (``grace``), which the config keeps at 3 reconnect delays or more.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from functools import partial
from typing import Any

from aiohttp import web
from streamqueue import wire
from streamqueue.client import Chunk, ReplyStream

from .core import GATEWAY, QUEUE_ERRORS, Gateway, Ticket, queue_error
from .errors import ApiError
from .openai_api import read_json
from .ownership import Owned
from .relay import relay

log = logging.getLogger(__name__)
_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")  # a stream entry id, as the events' ids are
STREAMS = web.AppKey("browser_streams", dict)  # request id -> the task serving its stream here


async def create(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    principal = gateway.principal(request, query_token=True)
    ticket = gateway.ticket(principal, await read_json(request))
    # The reply stream's position is read while the admission decides (both come before the send).
    admitted, start = await asyncio.gather(
        gateway.admit_ticket(ticket), _reply_position(ticket), return_exceptions=True
    )
    if isinstance(admitted, BaseException):
        raise admitted
    try:
        if isinstance(start, BaseException):
            raise start
        await gateway.ownership.bind(ticket.request_id, Owned(principal.user_id, ticket.chat.model, start))
        await ticket.queue.client.send(
            principal.user_id, ticket.chat.message, ticket.request_id, chat=ticket.chat.chat
        )
    except BaseException as exc:
        log.warning("request %s not created: %r", ticket.request_id, exc)
        await gateway.finish(ticket)
        if isinstance(exc, Exception) and not isinstance(exc, ApiError):
            raise ApiError(503, "the queue is unavailable", type="server_error", retry_after_s=1) from exc
        raise
    follower = asyncio.create_task(_follow(gateway, ticket, start), name="gateway-follow")
    gateway.tasks.add(follower)
    follower.add_done_callback(gateway.tasks.discard)
    # Shielded: a caller gone by now must still leave the grace timer behind (nobody will watch).
    await asyncio.shield(gateway.watches.detach(ticket.request_id, partial(gateway.cancel, ticket)))
    events = f"/v1/requests/{ticket.request_id}/events"
    return web.json_response({"id": ticket.request_id, "events": events}, status=202)


async def _reply_position(ticket: Ticket) -> str:
    """The newest entry of the user's reply stream before the request is sent: its replies come after."""
    client = ticket.queue.client
    key = wire.reply_stream(client.reply_prefix, ticket.principal.user_id)
    async with client.commands:
        last: Any = await client.redis.xrevrange(key, count=1)
    return str(last[0][0]) if last else "0-0"


async def _follow(gateway: Gateway, ticket: Ticket, start: str) -> None:
    """Read the request's reply to its end (on the follower client) and finish its quota."""
    stream = ticket.queue.follower.request_stream(
        ticket.principal.user_id, "", request_id=ticket.request_id, after=start,
        timeout=gateway.config.request_timeout_seconds,
    )  # fmt: skip
    try:
        await relay(gateway, ticket, stream, None, cancel_on_disconnect=False)
    except ApiError as exc:
        log.info("request %s ended: %s", ticket.request_id, exc.message)
    finally:
        await gateway.finish(ticket)


async def cancel(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    principal = gateway.principal(request, query_token=True)
    request_id = request.match_info["id"]
    owned = await gateway.ownership.lookup(principal.user_id, request_id)
    await gateway.queues[owned.model].client.cancel(principal.user_id, request_id)
    return web.Response(status=204)


async def events(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    principal = gateway.principal(request, query_token=True)
    request_id = request.match_info["id"]
    owned = await gateway.ownership.lookup(principal.user_id, request_id)
    after = request.headers.get("Last-Event-ID") or owned.start
    if not _ENTRY_ID.fullmatch(after):
        raise ApiError(400, "Last-Event-ID must be an event id of this stream", param="Last-Event-ID")
    await _take_over(request, request_id)
    client = gateway.queues[owned.model].client
    timeout = gateway.config.request_timeout_seconds
    stream = client.request_stream(principal.user_id, "", request_id=request_id, after=after, timeout=timeout)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    token = await gateway.watches.attach(request_id)
    try:
        await response.prepare(request)
        await response.write(gateway.config.sse_retry)
        await _write_events(response, stream)
    except BaseException:  # the browser went away: cancel unless it comes back in time
        cancel = partial(client.cancel, principal.user_id, request_id)
        await asyncio.shield(gateway.watches.detach(request_id, cancel))
        raise
    finally:
        await stream.aclose()
    await gateway.watches.done(request_id, token)
    await response.write_eof()
    return response


async def _write_events(response: web.StreamResponse, stream: ReplyStream) -> None:
    """Each chunk as an event, then ``done`` or ``error``."""
    try:
        async for chunk in stream:
            await response.write(_chunk_event(chunk))
        usage = stream.final.usage if stream.final is not None else None
        await response.write(_event("done", json.dumps({"usage": usage})))
    except QUEUE_ERRORS as exc:
        _, error = queue_error(exc)  # as the OpenAI and WebSocket routes answer it
        await response.write(_event("error", json.dumps(error.error())))


async def _take_over(request: web.Request, request_id: str) -> None:
    """A browser that reconnects before this replica noticed its old connection drop: end the old
    stream first (a client follows each request id once)."""
    streams: dict[str, asyncio.Task[Any]] = request.app[STREAMS]
    old = streams.get(request_id)
    current = asyncio.current_task()
    assert current is not None
    streams[request_id] = current

    def forget(task: asyncio.Task[Any]) -> None:
        if streams.get(request_id) is task:
            del streams[request_id]

    current.add_done_callback(forget)
    if old is not None and not old.done():
        old.cancel()
        await asyncio.gather(old, return_exceptions=True)


def _chunk_event(chunk: Chunk) -> bytes:
    """The data is JSON-encoded, so a newline in a chunk cannot end the event early."""
    return f"id: {chunk.entry_id}\ndata: {json.dumps(chunk)}\n\n".encode()


def _event(kind: str, data: str) -> bytes:
    return f"event: {kind}\ndata: {data}\n\n".encode()
