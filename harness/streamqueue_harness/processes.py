"""Child processes the harness starts (servers, worker stand-ins): spawn them so none outlives it.

Each child leads its own process group, so stopping it reaches anything it forked. Unless detached
(``make cluster`` leaves the control plane running on purpose), a child also asks the kernel for
SIGKILL when the thread that started it dies (``PR_SET_PDEATHSIG``): a pytest run that crashes or is
killed leaves nothing behind even though no Python cleanup code runs. Start long-lived children from
a thread that lives as long as they should (the main thread, or the thread that supervises them).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Self

from .eventually import eventually

_PR_SET_PDEATHSIG = 1
# Resolved once, in the parent: between fork and exec the child must not dlopen (another thread may
# have held the loader lock at fork time), only call what is already there.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            os._exit(127)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(127)

    return preexec


def spawn(
    args: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    detach: bool = False,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``args`` in a new process group with stdout and stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=None if detach else _die_with_parent(os.getpid()),
        )


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else: not ours to judge
        return True
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def stop_groups(
    processes: Sequence[tuple[int, subprocess.Popen[bytes] | None]],
    grace: float,
    sig: signal.Signals = signal.SIGTERM,
) -> None:
    """Signal each ``(pgid, popen)`` group, then SIGKILL whatever is still alive after ``grace`` seconds.

    ``popen`` is given when the caller started the process itself: it must be reaped, or its zombie
    would keep the group looking alive. Processes started by another invocation (``down``) are reaped
    by init.
    """
    for pgid, _ in processes:
        _signal_group(pgid, sig)
    pending = _still_running_after(list(processes), grace, 0.05)
    for pgid, popen in pending:
        _signal_group(pgid, signal.SIGKILL)
        if popen is not None:
            popen.wait()
    _still_running_after(pending, 5, 0.02)  # a SIGKILLed orphan lingers only until init reaps it


def _still_running_after(
    processes: list[tuple[int, subprocess.Popen[bytes] | None]], seconds: float, interval: float
) -> list[tuple[int, subprocess.Popen[bytes] | None]]:
    """The groups still running after ``seconds``; returns as soon as none is."""

    def all_exited() -> bool:
        return not any(_still_running(pgid, p) for pgid, p in processes)

    with contextlib.suppress(TimeoutError):
        eventually(all_exited, "the process groups to exit", seconds, interval, TimeoutError)
    return [(pgid, p) for pgid, p in processes if _still_running(pgid, p)]


def _still_running(pgid: int, popen: subprocess.Popen[bytes] | None) -> bool:
    if popen is not None:
        popen.poll()
    return group_alive(pgid)


@contextlib.contextmanager
def stopped_on_failure(stop: Callable[[], None]) -> Iterator[None]:
    """Run the block that starts a server; if it fails or is interrupted (Ctrl-C, a test's timeout),
    ``stop`` what it had started before the error goes on, so a half-started server leaves nothing
    running behind."""
    try:
        yield
    except BaseException:
        stop()
        raise


class Supervised:
    """A server the harness runs as one child process: ``start`` spawns it into ``proc``; ``stop`` ends
    its group (SIGTERM, SIGKILL after ``stop_grace`` seconds) and may be called twice; ``close`` also
    removes what the server left on disk; ``with`` is start, then close."""

    stop_grace: float = 5.0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_groups([(proc.pid, proc)], self.stop_grace)

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalServer(Supervised):
    """A ``Supervised`` HTTP server on ``host:port`` that logs into its ``workdir``: where to reach it
    and where its log is, said once. ``port`` is 0 until ``start`` has picked one."""

    log_name: str
    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / self.log_name
