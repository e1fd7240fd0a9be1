"""Headless Chromium (the Debian package) driven over the Chrome DevTools Protocol, for browser tests.

Why a small CDP client and not Playwright: a test here needs four protocol calls (find the page,
navigate, evaluate a script and await its promise), and aiohttp, already a dependency, speaks the
WebSocket they go over. Playwright from PyPI does work offline with ``executable_path=/usr/bin/chromium``
(checked with 1.65.3 and Debian's Chromium 156: launch, evaluate, close in 1.3 s), but it is a 54 MB
wheel that unpacks to 170 MB, 160 MB of it a bundled Node.js driver, plus greenlet, and each release is
built for one Chromium revision while Debian's moves on its own. Here the browser is the only moving
part, and CDP's core methods are stable across its releases.

``Chromium`` starts ``/usr/bin/chromium --headless`` in its own process group (it dies with the
thread that started it, like every harness child), with a fresh profile in a temporary directory
and ``--remote-debugging-port=0``: the port Chromium picked is read from ``DevToolsActivePort`` in
the profile. The page is then driven through its target's WebSocket: ``goto`` loads a URL and waits
for the document to be complete, ``evaluate`` runs JavaScript and returns the (awaited) value as JSON.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Any, Self

import aiohttp

from .eventually import eventually_async
from .processes import spawn, stop_groups

CHROMIUM = "/usr/bin/chromium"
_FLAGS = (
    "--headless",
    "--no-sandbox",  # the tests run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--no-first-run",
    "--disable-extensions",
    "--disable-background-networking",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class BrowserError(RuntimeError):
    """Chromium did not start, or a protocol call or a page script failed."""


class Chromium:
    """``async with Chromium() as browser:`` one headless browser with one page."""

    def __init__(self, executable: str = CHROMIUM, start_timeout: float = 60.0) -> None:
        if shutil.which(executable) is None:
            raise BrowserError(f"{executable} not found: apt-get install chromium (hack/setup.sh does)")
        self.executable = executable
        self.start_timeout = start_timeout
        self._profile = Path(tempfile.mkdtemp(prefix="sq-chromium-"))
        self._proc = spawn(
            [executable, *_FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            log=self._profile / "chromium.log",
        )
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()  # one call at a time: each reads its own answer off the socket

    async def __aenter__(self) -> Self:
        self._http = aiohttp.ClientSession()
        try:
            self._ws = await self._http.ws_connect(await self._page_socket(self._http), max_msg_size=0)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        await asyncio.to_thread(stop_groups, [(self._proc.pid, self._proc)], 10)
        shutil.rmtree(self._profile, ignore_errors=True)

    async def goto(self, url: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - a bound per call
        """Load ``url`` and wait until its document (and its scripts) finished loading."""
        result = await self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"loading {url}: {result['errorText']}")

        async def loaded() -> bool:
            return bool(await self.evaluate("document.readyState === 'complete'"))

        await eventually_async(loaded, f"{url} to load", timeout, 0.05, BrowserError)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page, a promise awaited; a thrown error raises."""
        params = {"expression": expression, "awaitPromise": True, "returnByValue": True}
        result = await self.call("Runtime.evaluate", params)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """One CDP command and its result; events (none are enabled) are skipped."""
        if self._ws is None:
            raise BrowserError("not connected: use `async with Chromium()`")
        async with self._lock:
            call_id = next(self._ids)
            await self._ws.send_json({"id": call_id, "method": method, "params": params or {}})
            while True:
                message = await self._ws.receive_json()
                if message.get("id") == call_id:
                    break
        if "error" in message:
            raise BrowserError(f"{method}: {message['error']}")
        result: dict[str, Any] = message["result"]
        return result

    async def _page_socket(self, http: aiohttp.ClientSession) -> str:
        """The WebSocket URL of the page Chromium opened, once its DevTools endpoint answers."""
        port_file = self._profile / "DevToolsActivePort"

        def started() -> str | None:
            if self._proc.poll() is not None:
                log = (self._profile / "chromium.log").read_text(errors="replace")[-2000:]
                raise BrowserError(f"chromium exited with {self._proc.returncode}: {log}")
            lines = port_file.read_text().split() if port_file.exists() else []
            return lines[0] if lines else None

        port = await eventually_async(
            started, "chromium's DevTools port", self.start_timeout, 0.05, BrowserError
        )
        async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise BrowserError(f"chromium has no page target: {targets}")
        return str(pages[0]["webSocketDebuggerUrl"])
