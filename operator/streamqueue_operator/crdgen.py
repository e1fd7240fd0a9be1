"""Generate the StreamQueue CRD from the pydantic models, and the chart's RBAC rules (``make crds``).

Kubernetes accepts only *structural* OpenAPI schemas: no ``$ref``, no ``anyOf`` with null, no
``additionalProperties: true``. This module rewrites pydantic's JSON Schema into that form, so the
models stay the one place where a field, its default or its range is declared. The chart's RBAC
rules are written from ``permissions.RULES`` the same way. ``--check`` exits non-zero when a
generated copy (``crds/``, the chart's ``crds/``, the chart's rules) no longer matches its source.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from . import models, permissions

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = f"{models.PLURAL}.{models.GROUP}.yaml"
OUTPUTS = (ROOT / "crds" / CRD_FILE, ROOT / "charts" / "streamqueue-operator" / "crds" / CRD_FILE)
HEADER = "# Generated from operator/streamqueue_operator/models.py by `make crds`. Do not edit.\n"
RULES_OUTPUT = ROOT / "charts" / "streamqueue-operator" / "templates" / "_rules.tpl"

_DROP = {"title", "$defs"}
_EXCLUSIVE = {"exclusiveMinimum": "minimum", "exclusiveMaximum": "maximum"}


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline ``$ref``s; collapse ``Optional`` and ``int | str`` unions into the structural form."""
    node = dict(schema)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}
    if "anyOf" in node:
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if sorted(v.get("type", "") for v in variants) == ["integer", "string"]:
            node["x-kubernetes-int-or-string"] = True  # Kubernetes' IntOrString: no type, no anyOf needed
        elif len(variants) != 1:
            raise ValueError(f"unions other than Optional[X] or int | str have no structural form: {schema}")
        else:
            node = {**structural(variants[0], defs), **node}
        if node.get("default", 0) is None:
            del node["default"]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = structural(value, defs)
        elif key == "description":  # a field's docstring, wrapped over lines in the source
            out[key] = " ".join(str(value).split())
        elif key in _EXCLUSIVE and not isinstance(value, bool):  # JSON Schema number -> OpenAPI boolean
            out[_EXCLUSIVE[key]] = value
            out[key] = True
        else:
            out[key] = value
    if out.get("x-kubernetes-preserve-unknown-fields") and out.get("additionalProperties") is True:
        del out["additionalProperties"]
    if out.get("default") == {} and "properties" in out:
        out["default"] = filled_default(out)
    return out


def filled_default(node: dict[str, Any]) -> dict[str, Any]:
    """An object default spelled out from its properties' defaults.

    The API server checks a default against the object's CEL rules without applying the nested
    defaults first, so ``default: {}`` would fail a rule such as ``self.minReplicas <= ...``.
    """
    return {name: sub["default"] for name, sub in node["properties"].items() if "default" in sub}


def _schema_of(model: type[models.BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True)
    return structural(raw, raw.get("$defs", {}))


def _printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Stream", "type": "string", "jsonPath": ".spec.stream"},
        {"name": "Backlog", "type": "integer", "jsonPath": ".status.backlog", "description": "lag + pending"},
        {"name": "Pending", "type": "integer", "jsonPath": ".status.pending"},
        {
            "name": "Replicas",
            "type": "string",
            "jsonPath": ".status.replicas",
            "description": "current/desired",
        },
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a plain dict."""
    spec_schema = _schema_of(models.StreamQueueSpec)
    spec_schema["default"] = {}
    root = {
        "type": "object",
        "description": "A Redis Streams work queue: its worker Deployment and the policy that sizes it.",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": _schema_of(models.StreamQueueStatus),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{models.PLURAL}.{models.GROUP}"},
        "spec": {
            "group": models.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": models.KIND,
                "listKind": f"{models.KIND}List",
                "plural": models.PLURAL,
                "singular": models.SINGULAR,
                "shortNames": models.SHORT_NAMES,
            },
            # Identical schemas: the API server converts by rewriting apiVersion (docs/upgrading.md).
            "conversion": {"strategy": "None"},
            "versions": [_version(name, root) for name in models.SERVED_VERSIONS],
        },
    }


def _version(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """One served version; ``models.VERSION`` is the storage version."""
    return {
        "name": name,
        "served": True,
        "storage": name == models.VERSION,
        "subresources": {"status": {}},
        "additionalPrinterColumns": _printer_columns(),
        "schema": {"openAPIV3Schema": schema},
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Spell out repeated values: anchors and aliases make a CRD hard to read and review."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render() -> str:
    """The CRD as the YAML text written to every output."""
    return HEADER + yaml.dump(build_crd(), Dumper=_NoAliasDumper, sort_keys=False, width=110)


def render_rules() -> str:
    """The chart's ``streamqueue.rules`` template: the Role/ClusterRole rules, from permissions.py."""
    rules = yaml.dump(
        permissions.role_rules(), Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=None
    )
    source = "operator/streamqueue_operator/permissions.py"
    header = f"{{{{- /* Generated from {source} by `make crds`. Do not edit. */ -}}}}"
    return f'{header}\n{{{{- define "streamqueue.rules" -}}}}\n{rules}{{{{- end }}}}\n'


def generated(crd_text: str) -> dict[Path, str]:
    """Every generated file and its expected content."""
    return {**dict.fromkeys(OUTPUTS, crd_text), RULES_OUTPUT: render_rules()}


def stale_outputs(text: str) -> list[Path]:
    return [path for path, want in generated(text).items() if not path.exists() or path.read_text() != want]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m streamqueue_operator.crdgen",
        description="Generate the StreamQueue CRD from the pydantic models into crds/ and the Helm chart.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the CRD files")
    mode.add_argument("--check", action="store_true", help="fail if a CRD file differs from the models")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        for path, content in generated(text).items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            print(f"wrote {path}")
        return 0
    if args.check:
        stale = stale_outputs(text)
        for path in stale:
            print(f"{path} is out of date: run `make crds`", file=sys.stderr)
        return 1 if stale else 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
