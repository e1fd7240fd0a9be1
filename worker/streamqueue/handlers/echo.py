"""The default handler: replies ``Echo: <message>``, as the article's worker does."""

from __future__ import annotations

from . import Message


async def handle(msg: Message) -> str:
    return f"Echo: {msg.message}"
