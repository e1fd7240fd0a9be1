"""The demo's handler: the echo reply after a pause, so a burst builds a visible backlog.

Real AI handlers are I/O-bound in the same way (they await a model server); the pause stands in for
that wait. ``STREAMQUEUE_DEMO_DELAY_MS`` sets it (default 50 ms).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any


async def handle(msg: Any) -> str:
    await asyncio.sleep(int(os.environ.get("STREAMQUEUE_DEMO_DELAY_MS", "50")) / 1000)
    return f"Echo: {msg.message}"
