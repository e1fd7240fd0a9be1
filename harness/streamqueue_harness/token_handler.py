"""A streaming stub handler: numbered tokens ``t0 t1 ...``, a pause between, as a model decodes.

Numbered tokens make a streamed reply checkable by eye and by code: a duplicate, a gap or a swap
shows in the text. The first token comes at once, so time to first token measures the queue and
what sits in front of it, not the stub; the pause after each (``STREAMQUEUE_TOKENS_INTERVAL_MS``,
default 20) stands for decoding and keeps a reply streaming long enough for a connection to drop in
the middle of it. ``STREAMQUEUE_TOKENS_COUNT`` (default 20) tokens per reply. A message
``tokens=<n> interval_ms=<ms>`` (either part alone too) overrides both for its reply, so one worker
serves short and long, slow and fast replies.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any


def tokens(count: int) -> list[str]:
    """The reply to a request for ``count`` tokens, chunk by chunk."""
    return [f"t{i} " for i in range(count)]


def _asked(message: str) -> dict[str, int]:
    """The message's ``key=<integer>`` words."""
    pairs = (word.partition("=") for word in message.split())
    return {key: int(value) for key, sep, value in pairs if sep and value.isdigit()}


async def handle(msg: Any) -> AsyncIterator[str]:
    asked = _asked(msg.message)
    count = asked.get("tokens", int(os.environ.get("STREAMQUEUE_TOKENS_COUNT", "20")))
    interval_s = asked.get("interval_ms", int(os.environ.get("STREAMQUEUE_TOKENS_INTERVAL_MS", "20"))) / 1000
    for i, token in enumerate(tokens(count)):
        if i:
            await asyncio.sleep(interval_s)
        yield token
