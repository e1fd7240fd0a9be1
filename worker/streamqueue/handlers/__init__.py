"""The handler contract: what a worker calls for each valid message, and how it is found by name.

A handler is ``async def handle(msg: Message) -> str | dict | AsyncIterator[str]``. Returning a
``str`` replies with it; a ``dict`` becomes the reply entry's fields (it must hold ``response`` so the
article's clients still read it); an async iterator (an ``async def`` with ``yield``) streams chunks
(and may add fields to the final entry through ``msg.final_fields``).
A handler that needs configuration (a URL, a session) is exposed as a ``HandlerFactory`` instead,
built once per worker from the worker's settings and closed when the worker stops.

A handler that calls a model API obeys the queue's shared limits (docs/ai.md, "Model-API limits"):
its factory builds ``streamqueue.limits.ModelLimits.from_settings(settings)``, keeps it as the
handler's ``limits`` attribute (the worker then counts its waits on its own metrics registry), wraps
each call in ``async with self.limits.call() as call`` (``call.report_tokens(n)`` when it knows the
tokens), calls ``await self.limits.pause(seconds)`` on a 429, and closes it in ``aclose``.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from ..metrics import WorkerMetrics
    from ..settings import WorkerSettings

Result: TypeAlias = str | Mapping[str, Any]
Handler: TypeAlias = Callable[["Message"], Awaitable[Result] | AsyncIterator[str]]


@dataclass(frozen=True)
class Message:
    """One request as the handler sees it: the validated wire fields plus delivery facts."""

    id: str
    stream: str
    user_id: str
    message: str
    request_id: str | None
    deliveries: int
    fields: Mapping[str, str] = field(default_factory=dict)
    # Extra fields for the final reply entry, set by a streaming handler (whose chunks are only text):
    # the model handler puts ``wire.USAGE`` here. A handler that returns a dict sets its fields directly.
    final_fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HandlerFactory:
    """A handler that must be built from the worker's settings (and may hold resources)."""

    build: Callable[[WorkerSettings], Handler]


class HandlerLoadError(ValueError):
    """``module:function`` does not name a usable handler."""


def load_handler(spec: str, settings: WorkerSettings, metrics: WorkerMetrics | None = None) -> Handler:
    """Import ``module:attribute`` and return the handler it names (building factories).

    With ``metrics``, a built handler's ``ModelLimits`` (its ``limits`` attribute) counts on them.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerLoadError(f"handler must be module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerLoadError(f"cannot import handler module {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerLoadError(f"module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(target, HandlerFactory):
        target = target.build(settings)
        _count_limits_on(target, metrics)
    if not callable(target):
        raise HandlerLoadError(f"handler {spec!r} is {type(target).__name__}, not callable")
    return target


def _count_limits_on(handler: object, metrics: WorkerMetrics | None) -> None:
    from ..limits import ModelLimits

    limits = getattr(handler, "limits", None)
    if metrics is not None and isinstance(limits, ModelLimits):
        limits.metrics = metrics


async def close_handler(handler: Handler) -> None:
    """Release what a built handler holds (an HTTP session); plain functions hold nothing."""
    aclose = getattr(handler, "aclose", None)
    if aclose is not None:
        await aclose()
