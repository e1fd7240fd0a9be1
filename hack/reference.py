"""Generate the reference tables in the docs: StreamQueue fields from the CRD, worker settings.

The CRD in ``crds/`` is itself generated from the operator's pydantic models, whose worker tuning
fields are derived from the worker's ``WorkerSettings``; the settings table comes from that class
directly. So every table users read has the same single source as the code. ``--check`` (run by the
tests) fails when a section is out of date; ``--write`` rewrites each section between its markers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic_core import PydanticUndefined
from streamqueue import acl
from streamqueue.settings import WorkerSettings, env_name
from streamqueue_operator import settings as operator_settings
from streamqueue_operator.models import WORKER_TUNING

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "crds" / "streamqueues.streamqueue.io.yaml"
BEGIN = "<!-- BEGIN GENERATED {} (python hack/reference.py --write) -->"
END = "<!-- END GENERATED {} -->"


def _validation(schema: dict[str, Any]) -> str:
    """The schema's constraints in words a user can act on."""
    parts = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    if "minimum" in schema or "maximum" in schema:
        parts.append(f"{schema.get('minimum', '')}..{schema.get('maximum', '')}")
    if "minLength" in schema or "maxLength" in schema:
        parts.append(f"length {schema.get('minLength', 0)}..{schema.get('maxLength', '')}")
    if "pattern" in schema:
        parts.append(f"matches `{schema['pattern']}`")
    if "maxItems" in schema:
        parts.append(f"at most {schema['maxItems']} items")
    return "; ".join(parts)


def _type(schema: dict[str, Any]) -> str:
    if schema.get("type") == "array":
        return f"[]{_type(schema.get('items', {}))}"
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return "object (Kubernetes)"
    if schema.get("x-kubernetes-int-or-string"):
        return "integer or string"
    return str(schema.get("type", "object"))


def _shown(value: Any) -> str:
    """A default as users write it: ``true``, ``30``, ``{a: 1}``; empty when there is none."""
    if value is None or value == {} or value is PydanticUndefined:  # unset, or computed at start-up
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    # One line however long: PyYAML wraps at 80 columns, which would split a table row.
    text = yaml.safe_dump(value, default_flow_style=True, width=sys.maxsize).strip().removesuffix("\n...")
    return f"`{text}`"


def _default(path: str, schema: dict[str, Any]) -> str:
    """The CRD default, or for an unset worker tuning field the worker's own default."""
    setting = WORKER_TUNING.get(path.removeprefix("worker.")) if path.startswith("worker.") else None
    if setting is None:
        return _shown(schema.get("default"))
    shown = _shown(WorkerSettings.model_fields[setting].default)
    return f"worker's {shown}" if shown else ""


def _cell(text: object) -> str:
    """``text`` as one Markdown table cell: a docstring wrapped over lines would end the row at its
    first newline, and a ``|`` would start another column."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _rows(schema: dict[str, Any], path: str) -> Iterator[tuple[str, str, str, str, str]]:
    for name, sub in schema.get("properties", {}).items():
        here = f"{path}.{name}" if path else name
        yield (
            here,
            _type(sub),
            _default(here, sub),
            _cell(_validation(sub)),
            _cell(sub.get("description", "")),
        )
        if sub.get("type") == "object" and "properties" in sub:
            yield from _rows(sub, here)
        if isinstance(sub.get("items"), dict) and "properties" in sub["items"]:
            yield from _rows(sub["items"], f"{here}[]")


def _rules(schema: dict[str, Any], path: str) -> Iterator[tuple[str, str]]:
    """(the field a refusal names, its message) for every CEL rule under ``path`` (``spec.<...>``)."""
    for rule in schema.get("x-kubernetes-validations", []):
        message = " ".join(str(rule.get("message") or rule.get("messageExpression")).split())
        yield path + rule.get("fieldPath", ""), message
    for name, sub in schema.get("properties", {}).items():
        yield from _rules(sub, f"{path}.{name}")


def spec_section() -> list[str]:
    """The StreamQueue fields and the API server's cross-field rules, from the CRD."""
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    lines = ["| field | type | default | validation | description |", "|---|---|---|---|---|"]
    for field, typ, default, validation, description in _rows(spec, ""):
        lines.append(f"| `spec.{field}` | {typ} | {default} | {validation} | {description} |")
    lines += ["", "Cross-field rules (checked by the API server on `kubectl apply`):", ""]
    for where, message in _rules(spec, "spec"):
        lines.append(f"- `{where}`: {message.strip(chr(39))}")
    return lines


def settings_section() -> list[str]:
    """The worker's environment variables (flags: the same name in kebab case), from WorkerSettings."""
    lines = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for name, info in WorkerSettings.model_fields.items():
        default = _shown(info.default) or "—"
        lines.append(f"| `{env_name(name)}` | {default} | {_cell(info.description)} |")
    return lines


# (file, marker name, section): every generated section of the docs.
SECTIONS = (
    ("README.md", "REFERENCE", spec_section),
    ("docs/operator.md", "REFERENCE", spec_section),
    ("docs/worker.md", "SETTINGS", settings_section),
    ("docs/operator.md", "OPERATOR SETTINGS", operator_settings.docs_table),
    ("docs/worker.md", "WORKER ACL", acl.worker_docs_table),
    ("docs/operator.md", "OPERATOR ACL", acl.operator_docs_table),
    ("docs/kubectl-sq.md", "TOOL ACL", acl.tool_docs_table),
)


def render(name: str, lines: list[str]) -> str:
    return "\n".join([BEGIN.format(name), "", *lines, "", END.format(name)])


def splice(text: str, name: str, section: str) -> str:
    start, end = text.index(BEGIN.format(name)), text.index(END.format(name)) + len(END.format(name))
    return text[:start] + section + text[end:]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the generated sections")
    mode.add_argument("--check", action="store_true", help="fail if a generated section is stale")
    args = parser.parse_args(argv)
    stale = []
    for file, name, section in SECTIONS:
        path = ROOT / file
        text = path.read_text()
        updated = splice(text, name, render(name, section()))
        if args.write:
            path.write_text(updated)
        elif updated != text:
            stale.append(file)
    for file in stale:
        print(f"{file}: a generated reference section is stale: run `python hack/reference.py --write`")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
