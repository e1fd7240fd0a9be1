"""OpenTelemetry traces into a real collector (hack/tools.sh ``otelcol``): one request's trace from the
client's send through a real worker process and the model handler (a stub chat server) to the commit,
read back from the collector's file exporter; and the off switch (``streamqueue.tracing.wanted``)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from aiohttp import web
from streamqueue import Client, tracing
from streamqueue_harness.eventually import eventually_async
from streamqueue_harness.modelserver import stream_completion
from streamqueue_harness.otelcol import Collector, ExportedSpan

SPAN_KIND_CONSUMER, SPAN_KIND_PRODUCER = 5, 4  # OTLP's enum values


@pytest.fixture
def collector(tmp_path) -> Iterator[Collector]:
    with Collector(tmp_path / "otelcol") as c:
        yield c


@pytest.mark.slow  # and needs otelcol-sq from hack/tools.sh, which `make test-fast`'s CI job does not build
async def test_a_request_is_one_trace_from_send_to_commit(
    collector, redis_server, worker_processes, stub, monkeypatch
) -> None:
    for name, value in {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_SERVICE_NAME": "sq-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s (the SDK's default: 5 s)
    }.items():
        monkeypatch.setenv(name, value)  # the client here and the worker process both read them

    async def words(request: web.Request) -> web.StreamResponse:
        return await stream_completion(request, ["Hello", " there"], interval_s=0.05)

    model = await stub(words)
    worker_processes.start(
        "w1",
        handler="streamqueue.handlers.openai:handle",
        openai_base_url=model.base_url,
        openai_model="stub",
    )
    async with Client(redis_server.url) as client:
        reply = await client.request("ada", "hi", timeout=60)
    assert reply.response == "Hello there"
    assert reply.trace_id is not None and len(reply.trace_id) == 32

    from opentelemetry import trace

    # The client's send span, exported now; shut down, so no later export tries the stopped collector.
    trace.get_tracer_provider().shutdown()  # type: ignore[attr-defined]
    names = ["streamqueue send", "streamqueue queue wait", "streamqueue process", "streamqueue handler"]
    names += ["model call", "streamqueue commit"]

    def whole_trace() -> dict[str, ExportedSpan] | None:
        spans = {s.name: s for s in collector.spans() if s.trace_id == reply.trace_id}
        return spans if set(names) <= spans.keys() else None

    spans = await eventually_async(whole_trace, "every span of the request's trace", timeout=30)
    send, wait, process = (
        spans["streamqueue send"],
        spans["streamqueue queue wait"],
        spans["streamqueue process"],
    )
    handler, call, commit = spans["streamqueue handler"], spans["model call"], spans["streamqueue commit"]
    assert send.parent_span_id == "" and send.kind == SPAN_KIND_PRODUCER
    assert wait.parent_span_id == send.span_id
    assert process.parent_span_id == send.span_id and process.kind == SPAN_KIND_CONSUMER
    assert handler.parent_span_id == process.span_id
    assert call.parent_span_id == handler.span_id
    assert call.events == (tracing.FIRST_TOKEN,)
    assert commit.parent_span_id == process.span_id
    # The queue wait ends where the worker's processing starts; the commit follows the handler.
    assert wait.end_ns == process.start_ns and wait.start_ns <= wait.end_ns
    assert commit.start_ns >= handler.end_ns and commit.end_ns <= process.end_ns
    assert process.attributes["messaging.message.id"] == send.attributes["messaging.message.id"]
    assert {s.service for s in spans.values()} == {"sq-test"}


@pytest.mark.parametrize(
    ("environ", "explicit", "on"),
    [
        ({}, None, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, None, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4318/v1/traces"}, None, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, None, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, None, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, None, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, False, False),
        ({}, True, True),
    ],
)
def test_tracing_is_off_unless_configured(environ: dict[str, str], explicit: bool | None, on: bool) -> None:
    assert tracing.wanted(explicit, environ) is on


def test_the_off_path_imports_no_opentelemetry() -> None:
    """A worker's and a client's set-up with tracing off loads no opentelemetry module of its own
    (redis-py 8 imports parts of it by itself when it is installed: those are the baseline)."""
    code = (
        "import sys, redis.asyncio, aiohttp\n"
        "before = {m for m in sys.modules if m.startswith('opentelemetry')}\n"
        "import streamqueue.worker.entry, streamqueue.client, streamqueue.handlers.openai\n"
        "from streamqueue import tracing\n"
        "assert tracing.tracer(None, 'x') is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry') and m not in before))\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_traceparent_round_trip() -> None:
    """What ``inject`` writes into an entry, ``extract`` reads back as the remote parent; a malformed
    traceparent gives no parent (the worker's trace starts on its own)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    span = TracerProvider().get_tracer("test").start_span("send")
    fields: dict[str, str] = {}
    tracing.inject(span, fields)
    parent = trace.get_current_span(tracing.extract(fields)).get_span_context()
    sent = span.get_span_context()
    assert (parent.trace_id, parent.span_id, parent.is_remote) == (sent.trace_id, sent.span_id, True)
    assert parent.trace_flags.sampled
    malformed = tracing.extract({"traceparent": "00-zz-yy-01"})
    assert not trace.get_current_span(malformed).get_span_context().is_valid


@pytest.mark.parametrize(
    ("sampled", "expected"), [(False, []), (True, ["queue wait", "handler", "commit", "process"])]
)
async def test_a_sampled_out_entry_asks_for_no_more_spans(sampled: bool, expected: list[str]) -> None:
    """An entry whose process span is sampled out gets no queue-wait, handler or commit span (their
    sampler calls were most of the cost of tracing a sampled-out request); one sampled in gets all."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    async def handled() -> str:
        return "ok"

    exported = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON if sampled else ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    spans = tracing.EntrySpans(provider.get_tracer("test"), "1700000000000-0", {}, "q", 1)
    with spans.processing():
        assert await spans.handler(handled()) == "ok"
    acked: list[bool] = []
    _, committed = spans.committing([], lambda: acked.append(True))
    committed()
    assert acked == [True]
    assert [s.name.removeprefix("streamqueue ") for s in exported.get_finished_spans()] == expected
