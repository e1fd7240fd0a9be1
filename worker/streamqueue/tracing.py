"""OpenTelemetry traces (docs/observability.md, "Traces"): off unless configured, free when off.

A request's trace runs producer -> queue -> worker -> model -> reply. The client's ``streamqueue send``
span (PRODUCER) is written into the entry as a W3C ``traceparent`` (``wire.TRACEPARENT``); the worker
continues it with ``streamqueue queue wait`` (from the entry id's time to the pickup) and
``streamqueue process`` (CONSUMER, pickup to commit), under which ``streamqueue handler`` (the model
handler's ``model call`` beneath it, its first token an event) and ``streamqueue commit`` (the reply
handed to the outbox until its XACK ran). The final reply carries the trace id (``wire.TRACE_ID``).

On when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER``
(other than ``none``) is set and ``OTEL_SDK_DISABLED`` is not ``true``, or when the worker's
``otel_tracing`` setting (the client's ``tracing`` argument) says so; everything else is the SDK's
standard ``OTEL_*`` configuration (service name, resource attributes, sampler, batch processor,
exporter endpoint, headers). The SDK is the ``streamqueue[otel]`` extra and is imported only when on:
the off path is a None check, with no opentelemetry import.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from . import wire

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

T = TypeVar("T")

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
FIRST_TOKEN = "first token"
# The process's tracer once tracing is on (``tracer``); handlers reach it through ``start_span``.
_tracer: Tracer | None = None


def wanted(explicit: bool | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether to trace: ``explicit`` if given, else what the standard ``OTEL_*`` variables imply."""
    if explicit is not None:
        return explicit
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER")
    if exporter is not None:
        return exporter.strip().lower() not in ("", "none")
    return any(environ.get(name) for name in _ENDPOINTS)


def tracer(explicit: bool | None, service_name: str) -> Tracer | None:
    """The tracer to use, or None when tracing is off (then nothing of opentelemetry is imported).

    The first call that turns tracing on sets up the SDK, unless the application already set a
    TracerProvider of its own (then its provider, exporters and sampler are used as they are).
    """
    global _tracer
    if not wanted(explicit):
        return None
    if _tracer is None:
        _tracer = _set_up(service_name)
    return _tracer


def _set_up(service_name: str) -> Tracer:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    from . import __version__

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        named = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        )
        provider = TracerProvider(resource=Resource.create({} if named else {"service.name": service_name}))
        exporters = [e.strip().lower() for e in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
        for name in (e for e in exporters if e != "none"):  # none (with otel_tracing on): spans, no export
            exporter: SpanExporter = ConsoleSpanExporter() if name == "console" else _otlp_exporter()
            provider.add_span_processor(BatchSpanProcessor(exporter))  # flushed at exit (atexit)
        trace.set_tracer_provider(provider)
    return trace.get_tracer("streamqueue", __version__)


def _otlp_exporter() -> Any:
    """OTLP over HTTP (protobuf), the extra's exporter; gRPC if asked for and installed."""
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    if protocol == "grpc":  # needs opentelemetry-exporter-otlp-proto-grpc (not in the extra: grpcio is large)
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

        return Grpc()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout: from OTEL_EXPORTER_OTLP_*


def inject(span: Span, fields: dict[Any, Any]) -> None:
    """Write ``span``'s context into a request entry (``traceparent``, and ``tracestate`` if any)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:  # a no-op span (an application's provider that records nothing)
        return
    fields[wire.TRACEPARENT] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
    if ctx.trace_state:
        fields[wire.TRACESTATE] = ctx.trace_state.to_header()


def extract(fields: Mapping[str, str]) -> Context:
    """The producer's context from an entry's ``traceparent`` (an empty context if it has none or
    it is malformed: the worker's spans then start a trace of their own)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(fields)


def trace_id(span: Span) -> str:
    return f"{span.get_span_context().trace_id:032x}"


def start_span(name: str, attributes: Mapping[str, Any] | None = None) -> Span | None:
    """A span under the current one (e.g. the handler's), not made current; None when tracing is off.

    For code without a tracer of its own (a handler): the caller ends it.
    """
    if _tracer is None:
        return None
    return _tracer.start_span(name, attributes=attributes)


def record_failure(span: Span, exc: BaseException) -> None:
    """Mark ``span`` failed by ``exc`` (not when its generator was merely closed early)."""
    if isinstance(exc, GeneratorExit):
        return
    from opentelemetry.trace import StatusCode

    span.record_exception(exc)
    span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")


class EntrySpans:
    """The worker's spans for one delivery of an entry (see the module docstring)."""

    def __init__(
        self, tracer: Tracer, entry_id: str, fields: Mapping[str, str], stream: str, deliveries: int
    ) -> None:
        from opentelemetry.trace import SpanKind

        self.tracer = tracer
        parent = extract(fields)
        now_ns = time.time_ns()
        added_ns = wire.parse_entry_id(entry_id)[0] * 1_000_000
        attributes: dict[str, str | int] = {
            "messaging.system": "redis",
            "messaging.destination.name": stream,
            "messaging.message.id": entry_id,
            "messaging.redis.deliveries": deliveries,
        }
        self.process = tracer.start_span(
            "streamqueue process",
            context=parent,
            kind=SpanKind.CONSUMER,
            start_time=now_ns,
            attributes=attributes,
        )
        # Sampled out: the other spans would be sampled out too; not asking the sampler saves their cost.
        self.recording = self.process.is_recording()
        if self.recording:
            wait = tracer.start_span(
                "streamqueue queue wait",
                context=parent,
                start_time=min(added_ns, now_ns),
                attributes=attributes,
            )
            wait.end(end_time=now_ns)

    @contextmanager
    def processing(self) -> Iterator[None]:
        """Make the process span current (handler and commit spans go under it)."""
        from opentelemetry.trace import use_span

        with use_span(self.process, end_on_exit=False, record_exception=True, set_status_on_exception=True):
            yield

    async def handler(self, run: Awaitable[T]) -> T:
        """Await the handler's work under a ``streamqueue handler`` span (current, so the model
        handler's spans go beneath it)."""
        if not self.recording:
            return await run
        with self.tracer.start_as_current_span("streamqueue handler"):
            return await run

    def committing(self, writes: T, committed: Callable[[], None]) -> tuple[T, Callable[[], None]]:
        """The commit ``(writes, committed)`` with a ``streamqueue commit`` span from now until
        ``committed`` runs (the reply written and the entry acknowledged); then the process span ends."""
        from opentelemetry.trace import set_span_in_context

        if not self.recording:
            return writes, committed
        commit = self.tracer.start_span("streamqueue commit", context=set_span_in_context(self.process))

        def done() -> None:
            commit.end()
            self.process.end()
            committed()

        return writes, done

    def failed(self) -> None:
        """The delivery failed (it will be retried, reclaimed or dead-lettered): end its process span."""
        from opentelemetry.trace import StatusCode

        self.process.set_status(StatusCode.ERROR, "the delivery failed")
        self.process.end()
