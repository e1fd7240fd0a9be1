"""A real Prometheus (Debian's ``prometheus`` package) scraping the harness's operator and workers.

``Prometheus`` starts ``prometheus`` on a free loopback port with a generated configuration: every job
scraped (and every rule evaluated) each second, storage in a temporary directory, short retention,
the given rule files loaded. It waits until the server is ready, answers PromQL through the HTTP API
(``query``, ``query_range``, ``alerts``) and stops the server's whole process group, so nothing
outlives the test (``processes.spawn``/``stop_groups``).

Worker processes of the pod runner listen on ports the runner picks; ``WorkerTargets`` reads each
one's ``STREAMQUEUE_HEALTH_PORT`` from ``/proc/<pid>/environ`` and keeps a file_sd file up to date,
which Prometheus re-reads on change.

``python -m streamqueue_harness.prometheus plot`` runs the local demo with Prometheus scraping it and
draws the dashboard's main panels from the recorded series into ``docs/img/dashboard.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .eventually import eventually
from .operatorproc import OperatorProcess, install_crd
from .ports import free_port
from .processes import LocalServer, spawn

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "streamqueue-operator"
RULES_FILE = CHART / "alerts" / "streamqueue-rules.yaml"
DASHBOARD_FILE = CHART / "dashboards" / "streamqueue.json"
LOOPBACK = "127.0.0.1"


class PrometheusError(RuntimeError):
    """Prometheus could not be started, or answered a request with an error."""


@dataclass(frozen=True)
class ScrapeJob:
    """One scrape job: static ``targets`` (host:port) and/or a ``file_sd`` file, scraped every second.

    ``honor_labels`` keeps the scraped series' own ``namespace``/``name`` labels (the operator's) when
    the target has labels of the same names.
    """

    name: str
    targets: Sequence[str] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    file_sd: Path | None = None
    honor_labels: bool = True

    def config(self, interval: str) -> dict[str, Any]:
        job: dict[str, Any] = {
            "job_name": self.name,
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "honor_labels": self.honor_labels,
        }
        if self.targets:
            job["static_configs"] = [{"targets": list(self.targets), "labels": dict(self.labels)}]
        if self.file_sd is not None:
            job["file_sd_configs"] = [{"files": [str(self.file_sd)], "refresh_interval": interval}]
        return job


def binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise PrometheusError("prometheus not found: run `make setup` (Debian package prometheus)")
    return path


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        raise PrometheusError("promtool not found: run `make setup` (Debian package prometheus)")
    return path


class Prometheus(LocalServer):
    """``prometheus`` on ``127.0.0.1:<free port>``; a context manager, or ``start()``/``stop()``."""

    stop_grace = 10.0
    log_name = "prometheus.log"

    def __init__(
        self,
        jobs: Sequence[ScrapeJob],
        rule_files: Sequence[Path] = (),
        *,
        interval: str = "1s",
        workdir: Path | None = None,
        retention: str = "2h",
    ) -> None:
        self.jobs = list(jobs)
        self.rule_files = [Path(p) for p in rule_files]
        self.interval = interval
        self.retention = retention
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="sq-prom-"))

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [job.config(self.interval) for job in self.jobs],
        }

    def start(self, timeout: float = 30.0) -> Prometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        for attempt in range(3):  # the free port may be taken before prometheus binds it
            self.port = free_port()
            args = [
                binary(),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--storage.tsdb.retention.time={self.retention}",
                f"--web.listen-address={self.host}:{self.port}",
                "--log.level=info",
            ]
            self.proc = spawn(args, log=self.log_path, cwd=self.workdir)
            try:
                self._wait_ready(timeout)
                return self
            except PrometheusError:
                self.stop()
                if attempt == 2 or "address already in use" not in self.log_path.read_text(errors="replace"):
                    raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        try:
            eventually(self._ready, "prometheus /-/ready", timeout, error=PrometheusError)
        except PrometheusError as exc:
            raise PrometheusError(f"{exc}: {self.log_tail()}") from None

    def _ready(self) -> bool:
        assert self.proc is not None, "prometheus is not running"
        if self.proc.poll() is not None:
            raise PrometheusError(f"prometheus exited with {self.proc.returncode}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- HTTP API ------------------------------------------------------------------------------------

    def api(self, path: str, **params: Any) -> dict[str, Any]:
        """GET ``/api/v1/<path>``; the whole answer (``status``, ``data``, ``error``...), errors included."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422/503 carry a JSON error body
            body = json.loads(exc.read() or b"{}") or {"status": "error", "error": str(exc)}
        return body

    def _data(self, path: str, **params: Any) -> Any:
        body = self.api(path, **params)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query: the result's series (``metric``, ``value``); raises if the expression fails."""
        data = self._data("query", query=expr)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """Range query: the result's series (``metric``, ``values``)."""
        return list(self._data("query_range", query=expr, start=start, end=end, step=step)["result"])

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending or firing), as ``/api/v1/alerts`` lists them."""
        return list(self._data("alerts")["alerts"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self._data("targets")["activeTargets"])

    def rule_groups(self) -> list[dict[str, Any]]:
        return list(self._data("rules")["groups"])

    def wait_for(self, check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
        """Poll ``check`` until it returns something truthy; PrometheusError after ``timeout`` seconds."""
        return eventually(check, what, timeout, interval, error=PrometheusError)

    def wait_for_targets(self, job: str, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Block until ``count`` targets of ``job`` have been scraped successfully."""

        def healthy() -> list[dict[str, Any]]:
            up = [t for t in self.targets() if t["labels"].get("job") == job and t["health"] == "up"]
            return up if len(up) >= count else []

        return list(self.wait_for(healthy, timeout, f"{count} healthy target(s) of job {job}"))


# ---- the pod runner's worker processes as scrape targets ---------------------------------------------


def process_health_port(pid: int) -> int | None:
    """``STREAMQUEUE_HEALTH_PORT`` of a running process, from its environment; None if unknown."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(b"STREAMQUEUE_HEALTH_PORT="):
            value = entry.split(b"=", 1)[1]
            return int(value) if value.isdigit() else None
    return None


def write_file_sd(path: Path, groups: Sequence[tuple[Sequence[str], Mapping[str, str]]]) -> None:
    """Write a file_sd file atomically (Prometheus may read it at any moment)."""
    content = [{"targets": list(targets), "labels": dict(labels)} for targets, labels in groups]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, path)


class WorkerTargets:
    """Keeps a file_sd file listing the running worker processes of a pod runner, with labels.

    ``running`` returns Pod name -> pid (``WorkerPodRunner.running``); each worker becomes a target
    ``127.0.0.1:<its health port>`` labelled with ``namespace``, ``pod`` and the extra ``labels``,
    as Kubernetes service discovery would label a worker pod.
    """

    def __init__(
        self,
        path: Path,
        running: Callable[[], Mapping[str, int]],
        namespace: str,
        labels: Mapping[str, str] | None = None,
        interval: float = 0.5,
    ) -> None:
        self.path = path
        self.running = running
        self.namespace = namespace
        self.labels = dict(labels or {})
        self.interval = interval
        self.seen: set[str] = set()  # every pod that was ever a target
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-targets", daemon=True)

    def refresh(self) -> dict[str, int]:
        """Write the current targets now; returns pod name -> port."""
        ports = {}
        for pod, pid in sorted(self.running().items()):
            port = process_health_port(pid)
            if port is not None:
                ports[pod] = port
        groups = [
            ([f"{LOOPBACK}:{port}"], {"namespace": self.namespace, "pod": pod, **self.labels})
            for pod, port in ports.items()
        ]
        write_file_sd(self.path, groups)
        self.seen.update(ports)
        return ports

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()

    def start(self) -> WorkerTargets:
        self.refresh()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> WorkerTargets:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- the chart's dashboard and rules ---------------------------------------------------------------


def dashboard(path: Path = DASHBOARD_FILE) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def panel_queries(board: Mapping[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(panel title, refId, expr) of every target of every panel, rows' nested panels included."""
    for panel in board.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                if target.get("expr"):
                    yield inner["title"], target.get("refId", ""), target["expr"]


def substitute(expr: str, variables: Mapping[str, str], rate_interval: str = "1m") -> str:
    """A panel expression with Grafana's variables replaced, ready for Prometheus."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"dashboard variable ${name} has no value")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def rule_groups(
    path: Path = RULES_FILE, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The rules file's groups, with per-alert changes applied exactly as the chart's template does.

    Kept identical to ``templates/prometheusrule.yaml`` by a test that renders the chart with the
    same overrides and compares.
    """
    groups: list[dict[str, Any]] = yaml.safe_load(path.read_text())["groups"]
    overrides = overrides or {}
    result = []
    for group in groups:
        rules = []
        for rule in group["rules"]:
            change = overrides.get(rule.get("alert", ""), {})
            if change.get("enabled", True) is False:
                continue
            rule = json.loads(json.dumps(rule))
            if change.get("for"):
                rule["for"] = change["for"]
            if change.get("window"):
                rule["expr"] = re.sub(r"\[[0-9]+[smhdwy]\]", f"[{change['window']}]", rule["expr"])
            if "threshold" in change:
                rule["expr"] = re.sub(r">\s*[0-9.eE+-]+\s*$", f"> {change['threshold']}", rule["expr"])
            if change.get("labels"):
                rule["labels"] = {**rule.get("labels", {}), **change["labels"]}
            rules.append(rule)
        result.append({"name": group["name"], "rules": rules})
    return result


# ---- python -m streamqueue_harness.prometheus plot ---------------------------------------------------

# The dashboard's main panels drawn by ``plot``: (panel title, unit label).
MAIN_PANELS = (
    ("Backlog (lag + pending) per queue", "entries"),
    ("Replicas: desired, current, worker pods scraped", "replicas"),
    ("Processing rate", "messages/s"),
    ("Handler latency", "seconds"),
)


def plot_panels(
    prom: Prometheus,
    board: Mapping[str, Any],
    variables: Mapping[str, str],
    start: float,
    end: float,
    out: Path,
    panels: Sequence[tuple[str, str]] = MAIN_PANELS,
    step: float = 1.0,
    rate_interval: str = "5s",
) -> None:
    """Draw ``panels`` of the dashboard from ``query_range`` over [start, end] into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_title = {p["title"]: p for p in board["panels"]}
    fig, axes = plt.subplots(len(panels) // 2, 2, figsize=(11, 2.6 * (len(panels) // 2)), squeeze=False)
    for ax, (title, unit) in zip(axes.flat, panels, strict=True):
        for target in by_title[title]["targets"]:
            expr = substitute(target["expr"], variables, rate_interval)
            for series in prom.query_range(expr, start, end, step):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                label = _legend(target.get("legendFormat", ""), series["metric"])
                ax.plot(xs, ys, label=label, drawstyle="steps-post" if unit == "replicas" else "default")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("streamqueue dashboard, main panels (real Prometheus data from the local demo)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def _legend(template: str, labels: Mapping[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


def plot_demo(out: Path, workdir: Path) -> int:
    """The short local demo with Prometheus scraping the operator and the workers; then ``plot_panels``."""
    import asyncio

    from . import demo
    from .controlplane import ControlPlane
    from .podrunner import WorkerPodRunner
    from .redis_server import RedisServer

    # The full demo's load (three bursts of 600, 8 s apart; 15 s stabilization): about a minute.
    cfg = demo.DemoConfig.from_args(
        argparse.Namespace(short=False, users=5, bursts=3, burst_size=600, workdir=workdir)
    )
    workdir.mkdir(parents=True, exist_ok=True)
    selector = f"{demo.GROUP}/queue={demo.QUEUE}"
    metrics_port = free_port()
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        plane = stack.enter_context(ControlPlane(workdir / "cluster"))
        install_crd(plane)
        plane.kubectl("create", "namespace", demo.NAMESPACE)
        operator = OperatorProcess(
            plane.kubeconfig, f"--namespace={demo.NAMESPACE}", workdir,
            f"--metrics-port={metrics_port}", f"--metrics-address={LOOPBACK}",
        ).start()  # fmt: skip
        stack.callback(operator.stop)
        runner = stack.enter_context(WorkerPodRunner(plane.kubeconfig, demo.NAMESPACE, selector))
        file_sd = workdir / "workers.json"
        targets = stack.enter_context(WorkerTargets(file_sd, runner.running, demo.NAMESPACE))
        jobs = [
            ScrapeJob("streamqueue-operator", targets=[f"{LOOPBACK}:{metrics_port}"]),
            ScrapeJob("streamqueue-worker", file_sd=file_sd, honor_labels=False),
        ]
        prom = stack.enter_context(Prometheus(jobs, [RULES_FILE], workdir=workdir / "prometheus"))
        prom.wait_for_targets("streamqueue-operator")
        plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(demo.queue_manifest(redis.url, cfg)))
        view = demo.KubeView(plane.kubeconfig)
        demo.wait_for_queue(view)
        start = time.time() - 5
        seen = asyncio.run(demo.run_load_and_watch(cfg, redis.url, view, runner))
        end = time.time()
        ok, text = demo.verdict(seen, cfg)
        print(f"[plot] demo {'passed' if ok else 'FAILED'}: {text}; {len(targets.seen)} worker pods scraped")
        variables = {"namespace": demo.NAMESPACE, "queue": demo.QUEUE, "datasource": ""}
        plot_panels(prom, dashboard(), variables, start, end, out)
        print(f"[plot] wrote {out} ({out.stat().st_size // 1024} KiB)")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamqueue_harness.prometheus")
    sub = parser.add_subparsers(dest="command", required=True)
    plot = sub.add_parser(
        "plot", help="run the short demo under Prometheus and draw the dashboard's main panels"
    )
    plot.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    plot.add_argument("--workdir", type=Path, default=ROOT / ".demo" / "prometheus-plot")
    args = parser.parse_args(argv)
    return plot_demo(args.out, args.workdir)


if __name__ == "__main__":
    raise SystemExit(main())
