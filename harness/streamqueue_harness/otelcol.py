"""A real OpenTelemetry Collector for the trace tests: ``otelcol-sq`` (hack/tools.sh ``otelcol``: the
OTLP receiver and the file exporter only) on a free loopback port, writing what it receives as OTLP
JSON lines into its work directory."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from .controlplane import default_bin_dir
from .eventually import eventually
from .ports import free_port
from .processes import LocalServer, spawn

READY = "Everything is ready"


@dataclass(frozen=True)
class ExportedSpan:
    """One span as the collector's file exporter wrote it (ids as hex, as in OTLP JSON)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    service: str
    start_ns: int
    end_ns: int
    events: tuple[str, ...]
    attributes: dict[str, Any]


class Collector(LocalServer):
    """``with Collector() as c``: ``c.endpoint`` takes OTLP/HTTP; ``c.spans()`` reads what it exported."""

    log_name = "otelcol.log"

    def __init__(self, workdir: Path | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="otelcol-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.output = self.workdir / "spans.jsonl"

    @property
    def endpoint(self) -> str:
        """The value for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (OTLP over HTTP): the collector's URL."""
        return self.url

    def start(self) -> Self:
        binary = default_bin_dir() / "otelcol-sq"
        if not binary.exists():
            raise FileNotFoundError(f"{binary} is missing: run `bash hack/tools.sh otelcol`")
        for _ in range(3):  # a free port may be taken between the probe and the bind
            self.port = free_port()
            config = self.workdir / "config.json"
            config.write_text(json.dumps(self._config()))
            self.proc = spawn([str(binary), "--config", str(config)], log=self.log_path)
            if eventually(self._ready_or_exited, "the collector to start or exit", timeout=60) == "ready":
                return self
            self.stop()
        raise RuntimeError(f"the collector did not start; see {self.log_path}")

    def _config(self) -> dict[str, Any]:
        return {
            "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"{self.host}:{self.port}"}}}},
            "exporters": {"file": {"path": str(self.output), "flush_interval": "100ms"}},
            "service": {
                "telemetry": {"metrics": {"level": "none"}},  # no internal metrics port to collide
                "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["file"]}},
            },
        }

    def _ready_or_exited(self) -> str | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            return "exited"
        return "ready" if READY in self.log_path.read_text(errors="replace") else None

    def spans(self) -> list[ExportedSpan]:
        """Every span exported so far."""
        if not self.output.exists():
            return []
        found = []
        for line in self.output.read_text().splitlines():
            if line.strip():
                found += _spans(json.loads(line))
        return found

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _spans(request: dict[str, Any]) -> list[ExportedSpan]:
    """The spans of one OTLP JSON ``ExportTraceServiceRequest``."""
    found = []
    for resource_spans in request.get("resourceSpans", []):
        resource = _attributes(resource_spans.get("resource", {}).get("attributes", []))
        for scope_spans in resource_spans.get("scopeSpans", []):
            for s in scope_spans.get("spans", []):
                found.append(
                    ExportedSpan(
                        name=s["name"],
                        trace_id=s["traceId"],
                        span_id=s["spanId"],
                        parent_span_id=s.get("parentSpanId", ""),
                        kind=int(s.get("kind", 0)),
                        service=str(resource.get("service.name", "")),
                        start_ns=int(s["startTimeUnixNano"]),
                        end_ns=int(s["endTimeUnixNano"]),
                        events=tuple(e["name"] for e in s.get("events", [])),
                        attributes=_attributes(s.get("attributes", [])),
                    )
                )
    return found


def _attributes(items: list[dict[str, Any]]) -> dict[str, Any]:
    """OTLP JSON key/values as a dict (each value's one field: stringValue, intValue, ...)."""
    return {a["key"]: next(iter(a["value"].values()), None) for a in items}
