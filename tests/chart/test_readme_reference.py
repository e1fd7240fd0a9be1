"""The README's StreamQueue reference is generated from the CRD; it must not drift."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.chart.helm import ROOT


def test_readme_reference_matches_the_crd() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "reference.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _load_reference() -> ModuleType:
    script = Path(__file__).resolve().parents[2] / "hack" / "reference.py"  # this checkout's
    spec = importlib.util.spec_from_file_location("reference", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(row: str) -> int:
    """Columns of a Markdown table row: its ``|`` separators, an escaped ``\\|`` not counted."""
    return len(re.findall(r"(?<!\\)\|", row)) - 1


@pytest.mark.parametrize("file,name", [(file, name) for file, name, _ in _load_reference().SECTIONS])
def test_every_generated_table_row_is_one_line_with_the_headers_columns(file: str, name: str) -> None:
    """A description wrapped over lines (a multi-line docstring, as chunk_flush_ms had) must not split
    its row: every line of a table starts and ends with ``|`` and has the header's column count, and a
    table ends at a blank line."""
    reference = _load_reference()
    [section] = [make for f, n, make in reference.SECTIONS if (f, n) == (file, name)]
    lines = reference.render(name, section()).split("\n")
    header: str | None = None
    for before, line in zip(["", *lines], lines, strict=False):
        if line.startswith("|"):
            header = header if before.startswith("|") else line
            assert line.endswith("|") and _cells(line) == _cells(header), f"{file} {name}: {line!r}"
        else:
            assert not before.startswith("|") or line == "", f"{file} {name}: a row goes on: {line!r}"
