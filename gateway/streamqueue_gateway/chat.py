"""The chat request a caller sends (``POST /v1/chat/completions``, ``POST /v1/requests``, WebSocket),
validated once and turned into what goes on the queue: the entry's ``chat`` field and ``message``.

Fields the gateway does not pass on (tools, logprobs, ...) are ignored, as OpenAI-compatible servers
commonly do; ``n`` other than 1 is refused, since one request gives one reply stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from streamqueue import wire

from .errors import ApiError

Role = Literal["system", "developer", "user", "assistant", "tool"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[dict[str, Any]] | None = None


class _StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[_Message] = Field(min_length=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None


@dataclass(frozen=True)
class ChatRequest:
    """A valid chat request: ``chat`` is the entry's ``chat`` field, ``message`` its ``message``."""

    model: str
    stream: bool
    include_usage: bool
    chat: dict[str, Any]
    message: str
    prompt_chars: int  # for the token estimate when the model reports no usage


def model_name(body: Any) -> str:
    """The ``model`` field alone: looked up before the rest is validated (404 before 400)."""
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", param="model")
    return model


def parse_chat(body: Any) -> ChatRequest:
    """Validate a chat request body; ApiError 400 naming the first invalid field."""
    try:
        parsed = _Body.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
    messages = body["messages"]  # as sent: extra fields (name, tool_call_id) pass through untouched
    chat: dict[str, Any] = {"messages": messages}
    values = parsed.model_dump(include=set(wire.CHAT_PARAMS), exclude_none=True)
    if parsed.max_tokens is None and parsed.max_completion_tokens is not None:
        values["max_tokens"] = parsed.max_completion_tokens
    chat.update(values)
    return ChatRequest(
        model=parsed.model,
        stream=parsed.stream,
        include_usage=bool(parsed.stream_options and parsed.stream_options.include_usage),
        chat=chat,
        message=_last_user_text(parsed.messages),
        prompt_chars=sum(len(_text(m.content)) for m in parsed.messages),
    )


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    return "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")


def _last_user_text(messages: list[_Message]) -> str:
    """What handlers that read only ``message`` see: the last user message's text."""
    return next((_text(m.content) for m in reversed(messages) if m.role == "user"), "")
