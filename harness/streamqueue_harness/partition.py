"""A loopback TCP proxy that can cut its traffic, to test what a network partition does to a client.

A stopped server refuses connections and clients notice at once; a partition does not. While
``partitioned`` the proxy keeps every connection open and forwards nothing, and connections made
during it are accepted and never answered: each request simply hangs, which is what a dropped
route looks like from both ends. After ``heal`` new connections are forwarded again, but the ones
that lived through the partition stay silent until their owner gives up on them, as after a real
partition where no RST ever arrives. A client passes only if it bounds every wait and reconnects.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from .ports import free_port

_CHUNK = 65536


class PartitionProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port`` in a background thread."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._epoch = 0  # bumped by each partition; a connection forwards only in its own epoch
        self._partitioned = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="partition-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> PartitionProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        return self

    def partition(self) -> None:
        """From now on nothing is forwarded, on existing connections or new ones."""
        self._loop.call_soon_threadsafe(self._cut)

    def heal(self) -> None:
        """New connections are forwarded again; those opened before the partition stay cut."""
        self._loop.call_soon_threadsafe(setattr, self, "_partitioned", False)

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> PartitionProxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _cut(self) -> None:
        self._partitioned = True
        self._epoch += 1

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()  # every pump sees end of file and returns
        connections = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if connections:  # all may have ended already; asyncio.wait refuses an empty set
            await asyncio.wait(connections, timeout=5)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.add(client_writer)
        try:
            await self._serve(client_reader, client_writer)
        finally:
            self._writers.discard(client_writer)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._partitioned:
            await _swallow(client_reader)
            client_writer.close()
            return
        epoch = self._epoch
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        self._writers.add(upstream_writer)
        try:
            await asyncio.gather(
                self._pump(client_reader, upstream_writer, epoch, to_client=False),
                self._pump(upstream_reader, client_writer, epoch, to_client=True),
            )
        finally:
            self._writers.discard(upstream_writer)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, epoch: int, *, to_client: bool
    ) -> None:
        """Copy one direction while the connection's epoch lasts; after that, read and drop.

        A cut connection never closes toward the client (that FIN would tell it what a partition
        never does); toward the server it closes once the client has given up.
        """
        try:
            while data := await reader.read(_CHUNK):
                if epoch == self._epoch:
                    writer.write(data)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            if epoch == self._epoch or not to_client:
                writer.close()


async def _swallow(reader: asyncio.StreamReader) -> None:
    """Read and drop until the peer closes: accepted, never answered."""
    try:
        while await reader.read(_CHUNK):
            pass
    except ConnectionError:
        pass
