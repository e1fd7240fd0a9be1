"""The long-running programs of a local cluster (control plane, node), and the file that records them.

Each component leads its own process group with its log under ``workdir/logs``. Unless detached, it
dies with the process that started it. Every launch is recorded in a JSON state file in ``workdir``,
so a later ``down`` (another process) stops exactly those programs, and never a recycled pid.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .eventually import eventually
from .processes import group_alive, spawn, stop_groups

STOP_GRACE_SECONDS = 10.0


class StartupError(RuntimeError):
    pass


class PortTakenError(StartupError):
    """A component lost the race for its free port; starting again with new ports fixes it."""


@dataclass
class Component:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    exe: str

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.popen.pid, "exe": self.exe}

    def failure(self, waiting_for: str) -> StartupError:
        """Why startup cannot go on: the component exited; the tail of its log says why."""
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
        message = f"{self.name} exited with {self.popen.returncode} while waiting for {waiting_for}:\n{tail}"
        return PortTakenError(message) if "address already in use" in tail else StartupError(message)


class Components:
    """The components one cluster piece started, in start order, recorded in ``workdir/state_file``."""

    def __init__(self, workdir: Path, state_file: str, *, detach: bool) -> None:
        self.workdir = workdir
        self.state_file = state_file
        self.detach = detach
        self.started: list[Component] = []
        self.facts: dict[str, Any] = {}  # recorded beside the processes, for `down` (a server URL, ...)

    def launch(
        self,
        binary: Path,
        args: Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> Component:
        """Start ``binary``; ``prefix`` is a launcher that execs it (``nsenter``: the recorded
        program stays ``binary``, which is what ``down`` checks before it stops a pid)."""
        name = name or binary.name
        log = self.workdir / "logs" / f"{name}.log"
        command = [*prefix, str(binary), *args]
        popen = spawn(command, log=log, detach=self.detach, cwd=self.workdir, env=env)
        component = Component(name, popen, log, os.path.realpath(binary))
        self.started.append(component)
        self.write_state()
        return component

    def write_state(self) -> None:
        state = {**self.facts, "processes": [c.record() for c in self.started]}
        (self.workdir / self.state_file).write_text(json.dumps(state, indent=2) + "\n")

    def wait(self, deadline: float, what: str, ready: Callable[[], bool], interval: float = 0.1) -> None:
        """Poll ``ready`` until it holds; fail fast, with the log's tail, when a component exits."""

        def all_running_and_ready() -> bool:
            for component in self.started:
                if component.popen.poll() is not None:
                    raise component.failure(what)
            return ready()

        logs = self.workdir / "logs"
        timeout = max(deadline - time.monotonic(), 0.0)
        eventually(all_running_and_ready, f"{what} (logs in {logs})", timeout, interval, StartupError)

    def stop(self, phases: Callable[[Sequence[str]], Iterable[set[str]]]) -> None:
        """Stop every component, phase by phase (``phases`` groups the names); safe to call twice."""
        components, self.started = self.started, []
        for phase in phases([c.name for c in components]):
            stop_groups([(c.popen.pid, c.popen) for c in components if c.name in phase], STOP_GRACE_SECONDS)
        (self.workdir / self.state_file).unlink(missing_ok=True)


def recorded_state(workdir: Path, state_file: str) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads((workdir / state_file).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return state


def running_components(workdir: Path, state_file: str) -> list[dict[str, Any]]:
    """The recorded components of ``workdir`` that are still alive (and still the same programs)."""
    return [p for p in recorded_state(workdir, state_file).get("processes", []) if _is_recorded_process(p)]


def _is_recorded_process(record: dict[str, Any]) -> bool:
    """Alive and running the recorded binary: a recycled pid must never be killed."""
    pid = int(record["pid"])
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return exe == record["exe"] and group_alive(pid)


def stop_recorded(
    workdir: Path, state_file: str, phases: Callable[[Sequence[str]], Iterable[set[str]]]
) -> int:
    """Stop the processes recorded in ``workdir/state_file``; returns how many were running."""
    alive = running_components(workdir, state_file)
    for phase in phases([str(p["name"]) for p in alive]):
        stop_groups([(int(p["pid"]), None) for p in alive if p["name"] in phase], STOP_GRACE_SECONDS)
    (workdir / state_file).unlink(missing_ok=True)
    return len(alive)
