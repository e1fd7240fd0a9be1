"""`make demo` in its short, unattended form: the whole product on this machine, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.kube
@pytest.mark.slow
def test_demo_scales_out_and_back_in(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{ROOT / '.tools' / 'bin'}:{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "streamqueue_harness.demo", "--short", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=ROOT,
    )
    output = result.stdout + result.stderr
    operator_log = tmp_path / "operator-1.log"
    if result.returncode != 0 and operator_log.exists():
        output += "\n--- operator log (tail) ---\n" + "\n".join(operator_log.read_text().splitlines()[-40:])
    assert result.returncode == 0, output
    assert "PASSED" in result.stdout
    # The live view showed the scale-out (desired above 1), then zero replicas and no worker left.
    lines = [line for line in result.stdout.splitlines() if "desired=" in line]
    assert any(int(line.split("desired=")[1].split()[0]) > 1 for line in lines)
    assert "desired=0 current=0 ready=0 processes=0" in lines[-1]
