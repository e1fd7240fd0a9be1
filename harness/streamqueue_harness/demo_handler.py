"""The demo's handler: the echo reply after a pause, so a burst builds a visible backlog.

Real AI handlers are I/O-bound in the same way (they await a model server); the pause stands in for
that wait. ``STREAMQUEUE_DEMO_DELAY_MS`` sets it (default 50 ms); ``STREAMQUEUE_DEMO_JITTER_MS`` adds
a random extra of up to that much, as a model's answers vary in length, so a later message can
overtake an earlier one unless something keeps them in order.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any


async def handle(msg: Any) -> str:
    delay_ms: float = int(os.environ.get("STREAMQUEUE_DEMO_DELAY_MS", "50"))
    delay_ms += random.uniform(0, int(os.environ.get("STREAMQUEUE_DEMO_JITTER_MS", "0")))
    await asyncio.sleep(delay_ms / 1000)
    return f"Echo: {msg.message}"
