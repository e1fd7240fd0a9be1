"""An HTTP/SSE front end for a streamqueue: a browser's EventSource resumes a streamed reply after a
dropped connection, receiving every chunk exactly once and in order (docs/ai.md).

    POST /requests {"user_id": "alice", "message": "hi"}  -> 202 {"request_id", "events"}
    GET  /requests/alice/<request_id>/events                -> text/event-stream

Each chunk is one SSE event whose ``id:`` is the reply-stream entry id it came from (the data is the
chunk, JSON-encoded); the last event is ``event: done`` (``event: error`` for an error reply). A
reconnecting EventSource sends ``Last-Event-ID`` = the last entry id it saw, and the front end
resumes right after it with ``client.request_stream(..., after=<id>)``; the first connection uses
``after="0-0"`` (the POST sent the request, so this GET never sends anything and can be retried).
Stateless: any replica of the front end can serve any reconnection.

    python examples/sse_frontend.py --redis-url redis://localhost:6379/0 --port 8000
"""

from __future__ import annotations

import argparse
import json
import uuid

from aiohttp import web
from streamqueue import Client
from streamqueue.client import ReplyError

CLIENT = web.AppKey("client", Client)


async def create_request(request: web.Request) -> web.Response:
    body = await request.json()
    user_id, message = str(body["user_id"]), str(body["message"])
    request_id = uuid.uuid4().hex
    try:
        await request.app[CLIENT].send(user_id, message, request_id)
    except ValueError as exc:  # what the worker would dead-letter: a bad user_id, a message too long
        raise web.HTTPBadRequest(text=str(exc)) from exc
    events = f"/requests/{user_id}/{request_id}/events"
    return web.json_response({"request_id": request_id, "events": events}, status=202)


async def events(request: web.Request) -> web.StreamResponse:
    user_id, request_id = request.match_info["user_id"], request.match_info["request_id"]
    after = request.headers.get("Last-Event-ID") or "0-0"
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    chunks = request.app[CLIENT].request_stream(user_id, "", request_id=request_id, after=after, timeout=120)
    try:
        async for chunk in chunks:
            await response.write(_event(chunk, chunk.entry_id))
        await response.write(_event("", None, "done"))  # the reply is the chunks, concatenated
    except ReplyError as exc:
        await response.write(_event(str(exc), exc.reply.entry_id, "error"))
    except TimeoutError:
        await response.write(_event("no reply in time", None, "error"))
    await response.write_eof()
    return response


def _event(data: str, entry_id: str | None, kind: str | None = None) -> bytes:
    """One SSE event; the data is JSON-encoded so newlines in a chunk cannot end the event early."""
    lines = [f"event: {kind}"] if kind else []
    if entry_id:
        lines.append(f"id: {entry_id}")
    lines.append(f"data: {json.dumps(data)}")
    return ("\n".join(lines) + "\n\n").encode()


def make_app(redis_url: str) -> web.Application:
    app = web.Application()
    app.router.add_post("/requests", create_request)
    app.router.add_get("/requests/{user_id}/{request_id}/events", events)

    async def client_context(app: web.Application):  # type: ignore[no-untyped-def]
        async with Client(redis_url) as client:
            app[CLIENT] = client
            yield

    app.cleanup_ctx.append(client_context)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://localhost:6379/0")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    web.run_app(make_app(args.redis_url), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
