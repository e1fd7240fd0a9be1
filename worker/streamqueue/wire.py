"""The wire format shared by the worker, the client and the article's original clients.

Every field name lives here so the worker, ``streamqueue.Client`` and the tests cannot drift apart.
Defaults are the article's names, so clients written for it keep working unchanged.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_STREAM = "user_messages_queue"
DEFAULT_GROUP = "ai_service_group"
DEFAULT_REPLY_PREFIX = "ai_to_user:"
DEAD_LETTER_SUFFIX = ":dead"

# Request entry (input stream).
USER_ID = "user_id"
MESSAGE = "message"
TIMESTAMP = "timestamp"
REQUEST_ID = "request_id"  # optional, echoed on every reply entry for correlation
# Optional: Unix time in milliseconds (an integer) after which the request is not worth answering;
# a worker that reads it later writes an EXPIRED reply instead of calling the handler.
DEADLINE = "deadline"
# Optional: the producer's W3C trace context (``streamqueue.tracing``), continued by the worker.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# Optional: an OpenAI chat request as JSON (the gateway writes it): ``{"messages": [...], "max_tokens",
# "temperature", ...}``. MESSAGE then holds the last user message's text, for handlers that read only
# that; the model handler sends CHAT's messages instead (docs/worker.md, "Wire format").
CHAT = "chat"
# The sampling parameters of a CHAT the model handler passes on to the model server (others are dropped).
CHAT_PARAMS = ("max_tokens", "temperature", "top_p", "stop", "presence_penalty", "frequency_penalty", "seed")

# Reply entry (``<reply_prefix><user_id>``). A streamed reply writes chunk entries (CHUNK, SEQ)
# before the final entry, which always carries the whole RESPONSE so article clients still work.
RESPONSE = "response"
WORKER_ID = "worker_id"
CHUNK = "chunk"
SEQ = "seq"  # the chunk entry's number within one delivery of the request: 0, 1, 2, ...
# Chunk entry format 2 (docs/worker.md, "Chunk entries"): the characters of the reply before this
# entry's text; an entry may hold several of the handler's chunks.
OFFSET = "offset"
# On the final entry of a model call, when the model server reported it: the OpenAI usage object as
# JSON (``{"prompt_tokens", "completion_tokens", "total_tokens"}``), what the gateway debits.
USAGE = "usage"
TRACE_ID = "trace_id"  # the request's trace (32 hex digits), on the final entry when the worker traces
ERROR = "error"  # set on an error reply sent to the user when a message is dead-lettered
CANCELLED = "cancelled"  # "1" on the final entry of a cancelled request (its RESPONSE is empty)
CANCELLED_YES = "1"
# The final entry of a request whose time ran out before a worker ran it (its RESPONSE is empty);
# the value says which limit: the queue's maxQueueAgeSeconds or the request's own DEADLINE.
EXPIRED = "expired"
EXPIRED_QUEUE_AGE = "max_queue_age"
EXPIRED_DEADLINE = "deadline"

# Cancel (docs/ai.md, "Cancel"): a client records ``<user_id>:<request_id>`` in the sorted set
# ``<stream>:cancelled`` (score: the time in ms; members older than the client's TTL are trimmed)
# and PUBLISHes the same member on the channel ``<stream>:cancel``. ``<stream>`` is the queue's base
# stream name, also when it is partitioned.
CANCEL_KEY_SUFFIX = ":cancelled"
CANCEL_CHANNEL_SUFFIX = ":cancel"
DEFAULT_CANCEL_TTL_SECONDS = 3600

# Per-user fairness (docs/ai.md, "Fairness"): entries waiting their turn are pending in the group
# under FAIR_CONSUMER (a name no pod can have) and ordered in the sorted set ``fair_key(partition)``
# by virtual finish time; the hash ``fair_clock_key(partition)`` holds each user's last tag and the
# partition's virtual time (field FAIR_CLOCK_NOW; a user_id has no colon, so it cannot collide).
FAIR_CONSUMER = "streamqueue:fair"
FAIR_CLOCK_NOW = ":now"

# Model-API limits (docs/ai.md, "Model-API limits"), shared by every worker of a queue and keyed by
# its base stream name (also when partitioned). ``limit_bound_key`` exists (value: one of the
# LIMIT_* reasons) while the queue's calls wait for a limit; it expires LIMIT_BOUND_TTL_MS after the
# last such wait. The operator reads it: a limit-bound queue is not scaled up.
LIMIT_REQUESTS = "RequestsPerMinute"
LIMIT_TOKENS = "TokensPerMinute"
LIMIT_CONCURRENT = "ConcurrentCalls"
LIMIT_RETRY_AFTER = "RetryAfter"
LIMIT_REASONS = (LIMIT_REQUESTS, LIMIT_TOKENS, LIMIT_CONCURRENT, LIMIT_RETRY_AFTER)
LIMIT_BOUND_TTL_MS = 15_000

# Dead-letter entry: the original fields plus these.
DL_REASON = "dl_reason"
DL_ERROR = "dl_error"
DL_DELIVERIES = "dl_deliveries"
DL_SOURCE_ID = "dl_source_id"
DL_SOURCE_STREAM = "dl_source_stream"
DL_CONSUMER = "dl_consumer"
DL_AT = "dl_at"
# Set on an entry put back into the queue from the dead letters (``streamqueue.deadletters``): how
# often it was redriven. A dead letter keeps it with the original fields, so a redriven entry that
# fails again shows its history.
REDRIVES = "redrives"

# Reasons recorded in DL_REASON.
REASON_MISSING_USER_ID = "missing_user_id"
REASON_INVALID_USER_ID = "invalid_user_id"
REASON_MESSAGE_TOO_LARGE = "message_too_large"
REASON_MISSING_MESSAGE = "missing_message"
REASON_MAX_DELIVERIES = "max_deliveries_exceeded"
REASON_INVALID_DEADLINE = "invalid_deadline"
REASON_INVALID_CHAT = "invalid_chat"

MAX_USER_ID_LENGTH = 128
# user_id becomes part of a Redis key: keep it to a conservative, unambiguous character set.
_USER_ID_RE = re.compile(r"[A-Za-z0-9_.@-]+")
# A DEADLINE below this (2001-09-09 in ms) is almost surely seconds: it would expire every request.
_MIN_DEADLINE_MS = 1_000_000_000_000


def reply_stream(prefix: str, user_id: str) -> str:
    """The per-user reply stream name (``ai_to_user:<user_id>`` by default)."""
    return f"{prefix}{user_id}"


def partition_of(user_id: str, partitions: int) -> int:
    """The partition a user's messages go to: CRC-32 of the UTF-8 ``user_id``, modulo ``partitions``.

    CRC-32 is the IEEE polynomial of zlib, Java's ``java.util.zip.CRC32``, Go's ``hash/crc32``
    (``ChecksumIEEE``) and Node's ``zlib.crc32``, so producers in any language route the same way:
    ``crc32("alice") = 663665735``, partition 3 of 4.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions}")
    return zlib.crc32(user_id.encode("utf-8")) % partitions


def partition_stream(stream: str, partition: int, partitions: int) -> str:
    """The key of one partition: ``<stream>:{<partition>}``, or ``stream`` itself when there is one.

    The braces are a Redis Cluster hash tag, so the partitions spread over the cluster's slots, and
    everything keyed after a partition (its dead-letter stream) lives in the same slot.
    """
    return stream if partitions == 1 else f"{stream}:{{{partition}}}"


def partition_streams(stream: str, partitions: int) -> list[str]:
    return [partition_stream(stream, p, partitions) for p in range(partitions)]


def cancel_key(stream: str) -> str:
    """The sorted set of cancelled requests of a queue (``stream``: its base name, not a partition)."""
    return f"{stream}{CANCEL_KEY_SUFFIX}"


def cancel_channel(stream: str) -> str:
    """The Pub/Sub channel on which cancels of a queue's requests are announced to its workers."""
    return f"{stream}{CANCEL_CHANNEL_SUFFIX}"


def cancel_member(user_id: str, request_id: str) -> str:
    """``<user_id>:<request_id>``: unambiguous, since a valid user_id has no colon."""
    return f"{user_id}:{request_id}"


def same_slot_key(key: str, suffix: str) -> str:
    """A key named after ``key`` that Redis Cluster stores in the same hash slot (so one script may
    use both): ``key`` + suffix if ``key`` has a hash tag (a partition does), else ``{key}`` + suffix.
    """
    opening = key.find("{")
    if opening != -1 and key.find("}", opening + 2) != -1:
        return key + suffix
    if "}" in key or "{" in key:
        raise ValueError(f"cannot derive a key in the hash slot of {key!r}: it has unmatched braces")
    return f"{{{key}}}{suffix}"


def fair_key(stream: str) -> str:
    """The sorted set of a partition's entries waiting for their fair turn."""
    return same_slot_key(stream, ":fair")


def fair_clock_key(stream: str) -> str:
    """The hash of a partition's per-user virtual finish tags and its virtual time."""
    return same_slot_key(stream, ":fair:clock")


def limits_key(stream: str) -> str:
    """The hash of a queue's shared rate-limit state (``stream``: its base name)."""
    return same_slot_key(stream, ":limits")


def limit_calls_key(stream: str) -> str:
    """The sorted set of a queue's model calls in progress (member: call id, score: lease expiry ms)."""
    return same_slot_key(stream, ":limits:calls")


def limit_bound_key(stream: str) -> str:
    """Present while a queue's calls wait for a model-API limit; its value is the LIMIT_* reason."""
    return same_slot_key(stream, ":limits:bound")


def lease_key(partition_stream: str) -> str:
    """A partition's lease (value: the holding worker), in the partition's own hash slot."""
    return f"{partition_stream}:lease"


def registry_key(stream: str) -> str:
    """The sorted set of a queue's live workers (member: worker name, score: heartbeat expiry ms)."""
    return f"{stream}:workers"


def memory_key(stream: str, user_id: str) -> str:
    """The list of a user's remembered exchanges for the model handler (``stream``: the queue's base name)."""
    return f"{stream}:memory:{user_id}"


def redrive_claim_key(dead_letter_stream: str, entry_id: str) -> str:
    """A redrive's claim on one dead letter while it is added to another hash slot's partition
    (``streamqueue.deadletters``); in the dead-letter stream's slot, so one script checks the letter is
    there and sets the claim. ``entry_id`` "": the prefix of a stream's claims."""
    return same_slot_key(dead_letter_stream, f":redrive:{entry_id}")


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable pair: ``"1700000000000-3"`` -> ``(1700000000000, 3)``.

    Compared as text, ``"9-0"`` would sort after ``"10-0"``; a bare ``"5"`` (as Redis accepts it) is ``5-0``.
    """
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def dead_letter_stream(stream: str) -> str:
    """Default dead-letter stream for an input stream."""
    return f"{stream}{DEAD_LETTER_SUFFIX}"


@dataclass(frozen=True)
class Rejection:
    """Why an entry must not reach the handler; it goes to the dead-letter stream instead."""

    reason: str
    detail: str


def user_id_rejection(user_id: str | None) -> Rejection | None:
    """Return a Rejection unless ``user_id`` is safe to use in a reply stream's key."""
    if user_id is None or user_id == "":
        return Rejection(REASON_MISSING_USER_ID, "entry has no user_id field (or it is empty)")
    if len(user_id) > MAX_USER_ID_LENGTH:
        return Rejection(
            REASON_INVALID_USER_ID, f"user_id is {len(user_id)} characters, limit {MAX_USER_ID_LENGTH}"
        )
    if not _USER_ID_RE.fullmatch(user_id):
        return Rejection(REASON_INVALID_USER_ID, "user_id may contain only letters, digits and _ . @ -")
    return None


def validate_request(fields: dict[str, str], max_message_bytes: int) -> Rejection | None:
    """Return a Rejection if the entry is not a well-formed request, else None.

    Checked before the handler so a malformed entry can never produce a reply on someone else's
    stream (or an unbounded key name) and is never silently dropped.
    """
    rejection = user_id_rejection(fields.get(USER_ID))
    if rejection is not None:
        return rejection
    message = fields.get(MESSAGE)
    if message is None:
        return Rejection(REASON_MISSING_MESSAGE, "entry has no message field")
    size = len(message.encode("utf-8", "surrogateescape"))
    if size > max_message_bytes:
        return Rejection(REASON_MESSAGE_TOO_LARGE, f"message is {size} bytes, limit {max_message_bytes}")
    deadline = fields.get(DEADLINE)
    if deadline is not None:
        rejection = deadline_rejection(deadline)
        if rejection is not None:
            return rejection
    chat = fields.get(CHAT)
    if chat is not None:
        return chat_rejection(chat, max_message_bytes)
    return None


def deadline_rejection(deadline: str) -> Rejection | None:
    """A Rejection unless ``deadline`` is Unix time in milliseconds, as a decimal integer.

    Refused rather than ignored: a producer that means a deadline but writes it wrong would
    otherwise have every request answered however late, or (seconds for ms) none at all.
    """
    if not (deadline.isascii() and deadline.isdigit()) or len(deadline) > 16:
        detail = f"deadline must be Unix time in ms (a decimal integer), not {deadline[:40]!r}"
        return Rejection(REASON_INVALID_DEADLINE, detail)
    if int(deadline) < _MIN_DEADLINE_MS:
        return Rejection(REASON_INVALID_DEADLINE, f"deadline {deadline} looks like seconds; it must be in ms")
    return None


def chat_rejection(chat: str, max_message_bytes: int) -> Rejection | None:
    """A Rejection unless ``chat`` is a JSON object with a non-empty ``messages`` list, within the size limit.

    Checked here rather than in the model handler: a malformed chat would fail every delivery the
    same way, so it goes to the dead letters at once with the reason instead of after maxDeliveries.
    """
    rejection = chat_size_rejection(chat, max_message_bytes)
    if rejection is not None:
        return rejection
    try:
        parsed = json.loads(chat)
    except ValueError:
        return Rejection(REASON_INVALID_CHAT, "chat is not JSON")
    return chat_object_rejection(parsed)


def chat_size_rejection(chat: str, max_message_bytes: int) -> Rejection | None:
    """A Rejection if the chat field's JSON is over the size limit."""
    size = len(chat.encode("utf-8", "surrogateescape"))
    if size > max_message_bytes:
        return Rejection(REASON_MESSAGE_TOO_LARGE, f"chat is {size} bytes, limit {max_message_bytes}")
    return None


def chat_object_rejection(chat: object) -> Rejection | None:
    """A Rejection unless ``chat`` (parsed) has a non-empty ``messages`` list of objects and, if it
    has one, a ``max_tokens`` that is a positive integer (the model handler computes with it)."""
    if not isinstance(chat, Mapping):
        return Rejection(REASON_INVALID_CHAT, "chat must be a JSON object with a non-empty messages list")
    messages = chat.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return Rejection(REASON_INVALID_CHAT, "chat must be a JSON object with a non-empty messages list")
    max_tokens = chat.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        return Rejection(
            REASON_INVALID_CHAT, f"chat.max_tokens must be a positive integer, not {max_tokens!r}"
        )
    return None


@dataclass(frozen=True)
class GroupInfo:
    """One consumer group as ``XINFO GROUPS`` reports it: the one parser of that reply.

    Replies are decoded text (``connection.connect`` decodes). ``lag`` and ``entries_read`` are None
    when Redis cannot tell (after XDEL, XTRIM or SETID): unknown, never zero.
    """

    name: str
    consumers: int
    pending: int
    last_delivered_id: str
    entries_read: int | None
    lag: int | None

    @classmethod
    def from_reply(cls, info: Mapping[str, Any]) -> GroupInfo:
        lag, entries_read = info.get("lag"), info.get("entries-read")
        return cls(
            name=str(info["name"]),
            consumers=int(info["consumers"]),
            pending=int(info["pending"]),
            last_delivered_id=str(info["last-delivered-id"]),
            entries_read=None if entries_read is None else int(entries_read),
            lag=None if lag is None else int(lag),
        )
