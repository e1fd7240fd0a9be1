"""The operator as production runs it, for tests, the demo and the benchmarks: CRD, then a process.

One way to install the generated CRD and one way to start ``python -m streamqueue_operator`` against
a local control plane, so the three callers cannot drift in flags, environment or shutdown.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml
from streamqueue_operator import crdgen, models

from .processes import Supervised, spawn


def install_crd(plane: Any) -> dict[str, Any]:
    """Apply the CRD generated from the models (server-side) and wait until it is established."""
    crd = crdgen.build_crd()
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump(crd))
    plane.wait_established(f"{models.PLURAL}.{models.GROUP}")
    return crd


class OperatorProcess(Supervised):
    """``streamqueue-operator <scope> <extra>`` in a subprocess; restartable, each run's log kept.

    ``stop`` is SIGTERM (kopf finishes its handlers, releases the Lease), SIGKILL after 20 s.
    """

    stop_grace = 20.0

    def __init__(
        self, kubeconfig: Path, scope: str, log_dir: Path, *extra: str, pythonpath: tuple[Path, ...] = ()
    ) -> None:
        """``pythonpath``: directories searched before the installed packages (another release's code)."""
        self.kubeconfig, self.scope, self.extra = kubeconfig, scope, extra
        self.pythonpath = pythonpath
        self.log_dir = log_dir
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"operator-{self.starts}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the operator is not running"
        return self.proc.pid

    def start(self) -> OperatorProcess:
        self.starts += 1
        ports = ["--metrics-port=0", "--liveness-port=0"]  # callers that want one pass it in ``extra``
        cmd = [sys.executable, "-m", "streamqueue_operator", self.scope, *ports, *self.extra]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONWARNINGS": "ignore"}
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(map(str, self.pythonpath))
        self.proc = spawn(cmd, log=self.log_path, env=env)
        return self

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.log_dir.glob("operator-*.log")))
