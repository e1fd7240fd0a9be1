"""Generate the README's StreamQueue reference table from the CRD in ``crds/``.

The CRD is itself generated from the operator's pydantic models, so the reference users read comes
from the same single source as the schema the API server enforces. ``--check`` (run by the tests)
fails when the README is out of date; ``--write`` rewrites the section between the markers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "crds" / "streamqueues.streamqueue.io.yaml"
README = ROOT / "README.md"
BEGIN = "<!-- BEGIN GENERATED REFERENCE (python hack/reference.py --write) -->"
END = "<!-- END GENERATED REFERENCE -->"


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
    return str(schema.get("type", "object"))


def _rows(schema: dict[str, Any], path: str) -> Iterator[tuple[str, str, str, str, str]]:
    for name, sub in schema.get("properties", {}).items():
        here = f"{path}.{name}" if path else name
        default = sub.get("default")
        shown = (
            ""
            if default is None or default == {}
            else f"`{yaml.safe_dump(default, default_flow_style=True).strip()}`"
        )
        if shown.endswith("\n...`"):
            shown = shown[:-5] + "`"
        description = " ".join(str(sub.get("description", "")).split())
        yield here, _type(sub), shown, _validation(sub), description
        if sub.get("type") == "object" and "properties" in sub:
            yield from _rows(sub, here)


def _rules(schema: dict[str, Any], path: str) -> Iterator[tuple[str, str]]:
    for rule in schema.get("x-kubernetes-validations", []):
        yield path or "spec", " ".join(str(rule.get("message") or rule.get("messageExpression")).split())
    for name, sub in schema.get("properties", {}).items():
        yield from _rules(sub, f"{path}.{name}" if path else name)


def render() -> str:
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    lines = [
        BEGIN,
        "",
        "| field | type | default | validation | description |",
        "|---|---|---|---|---|",
    ]
    for field, typ, default, validation, description in _rows(spec, ""):
        lines.append(f"| `spec.{field}` | {typ} | {default} | {validation} | {description} |")
    lines += ["", "Cross-field rules (checked by the API server on `kubectl apply`):", ""]
    for where, message in _rules(spec, ""):
        lines.append(f"- `spec.{where}`: {message.strip(chr(39))}")
    lines += ["", END]
    return "\n".join(lines)


def splice(readme: str, section: str) -> str:
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    return readme[:start] + section + readme[end:]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the README section")
    mode.add_argument("--check", action="store_true", help="fail if the README section is stale")
    args = parser.parse_args(argv)
    readme = README.read_text()
    updated = splice(readme, render())
    if args.write:
        README.write_text(updated)
        return 0
    if updated != readme:
        print("README.md's StreamQueue reference is stale: run `python hack/reference.py --write`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
