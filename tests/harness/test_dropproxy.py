"""DropProxy cuts where it says: right after the count-th marker, even one split across reads, on as
many connections as asked, and forwards everything else unchanged."""

from __future__ import annotations

import asyncio

import pytest
from streamqueue_harness.dropproxy import DropProxy

BODY = b"head\nid: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\ndata: c\n\n"


async def _serve_in_pieces(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send BODY three bytes at a time, so markers straddle reads; then close."""
    await reader.readexactly(2)  # the client's hello, forwarded upstream
    for start in range(0, len(BODY), 3):
        writer.write(BODY[start : start + 3])
        await writer.drain()
        await asyncio.sleep(0.001)  # one read per piece on the proxy's side, most of the time
    writer.close()


async def _fetch(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hi")
    received = await asyncio.wait_for(reader.read(), 30)  # until end of file
    writer.close()
    return received


async def test_cuts_after_the_count_th_marker_then_forwards_whole() -> None:
    server = await asyncio.start_server(_serve_in_pieces, "127.0.0.1", 0)
    async with server, DropProxy(server.sockets[0].getsockname()[1], b"id: ", 2, drops=1) as proxy:
        first = await _fetch(proxy.port)
        second = await _fetch(proxy.port)
    assert first == BODY[: BODY.index(b"id: 2") + len(b"id: ")]
    assert second == BODY
    assert (proxy.dropped, proxy.connections) == (1, 2)


async def test_stops_by_itself_after_its_lifetime() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; the proxy's expiry must end the connection

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server, DropProxy(server.sockets[0].getsockname()[1], b"id: ", 1, lifetime=0.5) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await asyncio.wait_for(reader.read(), 30) == b""  # end of file: the proxy closed it
        writer.close()
        with pytest.raises(ConnectionRefusedError):  # and it no longer listens
            await asyncio.open_connection("127.0.0.1", proxy.port)
