"""The entries the worker writes: replies, reply chunks, error replies and dead letters.

Field names come from ``wire`` so the client and the article's clients read what is written here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .. import wire


def _base(worker_id: str, request_id: str | None) -> dict[str, str]:
    fields = {wire.WORKER_ID: worker_id, wire.TIMESTAMP: f"{time.time():.6f}"}
    if request_id is not None:
        fields[wire.REQUEST_ID] = request_id
    return fields


def reply_fields(worker_id: str, request_id: str | None, result: str | Mapping[str, Any]) -> dict[str, str]:
    """The final reply entry. A mapping result supplies the fields itself and must hold ``response``."""
    if isinstance(result, str):
        return {wire.RESPONSE: result, **_base(worker_id, request_id)}
    if isinstance(result, Mapping):
        if wire.RESPONSE not in result:
            raise TypeError(f"a dict reply must contain {wire.RESPONSE!r} (article clients read it)")
        return {**_base(worker_id, request_id), **{str(k): str(v) for k, v in result.items()}}
    raise TypeError(f"handler returned {type(result).__name__}; expected str, dict or an async iterator")


def chunk_fields(worker_id: str, request_id: str | None, chunk: str, seq: int, offset: int) -> dict[str, str]:
    """One streamed chunk entry (format 2: ``offset``, the reply's characters before it); it carries
    no ``response`` so article clients skip it."""
    return {wire.CHUNK: chunk, wire.SEQ: str(seq), wire.OFFSET: str(offset), **_base(worker_id, request_id)}


def error_reply_fields(worker_id: str, request_id: str | None, error: str) -> dict[str, str]:
    """Tells the user their request was given up on; ``response`` keeps article clients informed."""
    return {wire.ERROR: error, wire.RESPONSE: f"Error: {error}", **_base(worker_id, request_id)}


def unanswered_fields(worker_id: str, request_id: str | None, why: str, value: str) -> dict[str, str]:
    """The final entry of a request the handler never answered: cancelled (``why`` = ``wire.CANCELLED``,
    ``value`` = ``wire.CANCELLED_YES``) or expired (``wire.EXPIRED``, a ``wire.EXPIRED_*`` reason). Its
    ``response`` is empty, so the article's clients (which wait for ``response``) stop waiting too."""
    return {wire.RESPONSE: "", why: value, **_base(worker_id, request_id)}


def dead_letter_fields(
    original: Mapping[str, str],
    *,
    reason: str,
    error: str,
    deliveries: int,
    source_id: str,
    source_stream: str,
    consumer: str,
) -> dict[str, str]:
    """The original entry plus why, when and by whom it was dead-lettered, so it can be replayed."""
    return {
        **original,
        wire.DL_REASON: reason,
        wire.DL_ERROR: error,
        wire.DL_DELIVERIES: str(deliveries),
        wire.DL_SOURCE_ID: source_id,
        wire.DL_SOURCE_STREAM: source_stream,
        wire.DL_CONSUMER: consumer,
        wire.DL_AT: f"{time.time():.6f}",
    }
