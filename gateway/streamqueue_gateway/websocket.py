"""``GET /v1/ws``: many chat requests over one WebSocket, each streamed back as it is produced.

Client -> server (JSON text frames):
    {"type": "chat", "ref": <anything>, "model": ..., "messages": [...], ...}   a chat body, plus ``ref``
    {"type": "cancel", "id": <request id>}                                      its stream then ends
                                                                                 with a "cancelled" error
Server -> client:
    {"type": "created", "ref": ..., "id": <request id>}
    {"type": "chunk", "id": ..., "text": ...}
    {"type": "done", "id": ..., "usage": {...}}
    {"type": "error", "id" or "ref": ..., "error": {"message", "type", "code"}}

Auth is checked once, at the upgrade (``Authorization`` or ``?access_token=``); each chat is admitted
like any other request (quota, backpressure). Closing the socket cancels every request still running
on it: disconnect = cancel.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import WSMsgType, web
from streamqueue.client import Chunk

from .auth import Principal
from .core import GATEWAY, Gateway, Ticket
from .errors import ApiError
from .relay import open_stream, relay

_HEARTBEAT_S = 30.0  # pings find a peer that vanished without closing


async def socket(request: web.Request) -> web.WebSocketResponse:
    gateway = request.app[GATEWAY]
    principal = gateway.principal(request, query_token=True)
    ws = web.WebSocketResponse(heartbeat=_HEARTBEAT_S)
    await ws.prepare(request)
    running: dict[str, tuple[Ticket, asyncio.Task[None]]] = {}
    try:
        async for frame in ws:
            if frame.type != WSMsgType.TEXT:
                continue
            try:
                message = json.loads(frame.data)
            except ValueError:
                await ws.send_json({"type": "error", "error": ApiError(400, "not JSON").error()})
                continue
            await _handle(gateway, principal, ws, message, running)
    finally:
        tasks = [task for _, task in running.values()]
        for task in tasks:
            task.cancel()  # each cancels its request on the queue
        await asyncio.gather(*tasks, return_exceptions=True)
    return ws


async def _handle(
    gateway: Gateway,
    principal: Principal,
    ws: web.WebSocketResponse,
    message: Any,
    running: dict[str, tuple[Ticket, asyncio.Task[None]]],
) -> None:
    kind = message.get("type") if isinstance(message, dict) else None
    if kind == "cancel":
        own = running.get(str(message.get("id")))
        if own is not None:  # only this socket's own requests; its stream ends with the "cancelled" error
            await gateway.cancel(own[0])
        return
    if kind != "chat":
        await ws.send_json({"type": "error", "error": ApiError(400, "type must be chat or cancel").error()})
        return
    ref = message.get("ref")
    try:
        ticket = await gateway.admit(principal, message)
    except ApiError as exc:
        await ws.send_json({"type": "error", "ref": ref, "error": exc.error()})
        return

    async def write(chunk: Chunk) -> None:
        await ws.send_json({"type": "chunk", "id": ticket.request_id, "text": str(chunk)})

    async def run() -> None:
        try:
            await ws.send_json({"type": "created", "ref": ref, "id": ticket.request_id})
            await relay(gateway, ticket, open_stream(gateway, ticket), write)
            await ws.send_json({"type": "done", "id": ticket.request_id, "usage": ticket.usage()})
        except ApiError as exc:
            await ws.send_json({"type": "error", "id": ticket.request_id, "error": exc.error()})
        except ConnectionError:
            pass  # the socket closed: relay cancelled the request
        finally:
            running.pop(ticket.request_id, None)
            await gateway.finish(ticket)

    running[ticket.request_id] = ticket, asyncio.create_task(run(), name="gateway-ws-request")
