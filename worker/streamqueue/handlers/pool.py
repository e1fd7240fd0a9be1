"""The HTTP connection pool a handler POSTs through: one aiohttp session for all of its calls."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from aiohttp.client import _RequestContextManager


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

    def post(self, url: str, body: dict[str, Any]) -> _RequestContextManager:
        """``session.post(url, json=body)``: use it as ``async with pool.post(...) as response``."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.connections)
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, headers=self.headers, connector=connector
            )
        return self._session.post(url, json=body)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
