"""The README's StreamQueue reference is generated from the CRD; it must not drift."""

from __future__ import annotations

import subprocess
import sys

from tests.chart.helm import ROOT


def test_readme_reference_matches_the_crd() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "reference.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
