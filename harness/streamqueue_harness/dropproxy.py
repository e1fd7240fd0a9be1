"""A loopback TCP proxy that drops a connection mid-stream, to test what a client does on reconnect.

``partition.PartitionProxy`` stands for a route that goes silent (no FIN ever arrives); this one
stands for the other failure, a connection that ends: a load balancer's idle cut, a gateway replica
that dies, Wi-Fi that roams. It forwards bytes unchanged both ways and, on the first ``drops``
connections whose server side sends ``marker`` for the ``count``-th time, forwards the bytes up to and
including that marker and then closes both ends. Cut right after an SSE ``id: `` field, the event it
begins arrives incomplete: a browser must drop it and ask for it again with ``Last-Event-ID``.

It runs in the caller's event loop (``async with DropProxy(...)``) and stops by itself after
``lifetime`` seconds, closing every connection, so a test that forgets it or hangs cannot leave it
forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Self

_CHUNK = 65536


class DropProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; ``dropped`` counts the connections it cut."""

    def __init__(
        self, target_port: int, marker: bytes, count: int, drops: int = 1, lifetime: float = 300.0
    ) -> None:
        self.target_port = target_port
        self.marker = marker
        self.count = count
        self.drops = drops
        self.lifetime = lifetime
        self.dropped = 0
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._expiry: asyncio.TimerHandle | None = None
        self._expired: asyncio.Task[None] | None = None  # the close that lifetime started, kept alive

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._expiry = asyncio.get_running_loop().call_later(self.lifetime, self._expire)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening and end every connection (also what ``lifetime`` does)."""
        if self._expiry is not None:
            self._expiry.cancel()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _expire(self) -> None:
        self._expired = asyncio.get_running_loop().create_task(self.close())

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            upload = asyncio.create_task(_copy(client_reader, upstream_writer))
            try:
                await self._download(upstream_reader, client_writer)
            finally:
                upload.cancel()
                await asyncio.gather(upload, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.close()
            self._tasks.discard(task)

    async def _download(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy server -> client; returns (so both ends close) at end of file or where this one is cut."""
        seen = 0
        tail = b""  # the end of the previous read, so a marker split across reads is still found
        while data := await reader.read(_CHUNK):
            cut = self._cut_at(tail + data, seen) if self.dropped < self.drops else None
            if cut is not None:
                self.dropped += 1
                writer.write(data[: max(0, cut - len(tail))])
                await writer.drain()
                return
            seen += (tail + data).count(self.marker)  # each ends in data: the tail is shorter
            tail = (tail + data)[-(len(self.marker) - 1) :] if len(self.marker) > 1 else b""
            writer.write(data)
            await writer.drain()

    def _cut_at(self, window: bytes, seen: int) -> int | None:
        """The end of the ``count``-th marker in ``window`` (``seen`` found before it), or None."""
        position = -1
        for _ in range(self.count - seen):
            position = window.find(self.marker, position + 1)
            if position < 0:
                return None
        return position + len(self.marker) if position >= 0 else None


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
