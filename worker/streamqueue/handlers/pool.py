"""The HTTP connection pool a model-API handler POSTs through: one aiohttp session for all its calls."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from ..limits import Retryable


class Pool:
    """One aiohttp session over at most ``connections`` connections, released by ``aclose``. The first
    ``post`` opens it: inside the event loop that runs the calls (where aiohttp wants a session
    created), and only for a handler that is called."""

    def __init__(
        self, connections: int, timeout: aiohttp.ClientTimeout, headers: dict[str, str] | None = None
    ) -> None:
        self.connections = connections
        self.timeout = timeout
        self.headers = headers or {}
        self._session: aiohttp.ClientSession | None = None

    @contextlib.asynccontextmanager
    async def post(self, url: str, body: dict[str, Any]) -> AsyncIterator[aiohttp.ClientResponse]:
        """``async with pool.post(url, body) as response``: POST ``body`` as JSON. A connection error or
        a timeout, in the POST or while the block reads the response, is ``Retryable``: a later
        attempt may get through."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.connections)
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, headers=self.headers, connector=connector
            )
        try:
            async with self._session.post(url, json=body) as response:
                yield response
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Retryable(f"{type(exc).__name__}: {exc or 'timed out'}") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
