"""A streaming stub handler: numbered tokens ``t0 t1 ...``, a pause between, as a model decodes.

Numbered tokens make a streamed reply checkable by eye and by code: a duplicate, a gap or a swap
shows in the text. The first token comes at once, so time to first token measures the queue and
what sits in front of it, not the stub; the pause after each (``STREAMQUEUE_TOKENS_INTERVAL_MS``,
default 20) stands for decoding and keeps a reply streaming long enough for a connection to drop in
the middle of it. ``STREAMQUEUE_TOKENS_COUNT`` (default 20) tokens per reply; a message
``tokens=<n>`` asks for ``n`` instead, so one worker serves short and long replies.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any


def tokens(count: int) -> list[str]:
    """The reply to a request for ``count`` tokens, chunk by chunk."""
    return [f"t{i} " for i in range(count)]


async def handle(msg: Any) -> AsyncIterator[str]:
    count = int(os.environ.get("STREAMQUEUE_TOKENS_COUNT", "20"))
    if msg.message.startswith("tokens="):
        count = int(msg.message.removeprefix("tokens="))
    interval_s = int(os.environ.get("STREAMQUEUE_TOKENS_INTERVAL_MS", "20")) / 1000
    for i, token in enumerate(tokens(count)):
        if i:
            await asyncio.sleep(interval_s)
        yield token
