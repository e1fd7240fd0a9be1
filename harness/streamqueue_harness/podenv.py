"""A container's environment, resolved from its Pod the way the kubelet does it.

The worker-pod runner starts local processes for Pods, and the process must see what the container
would: literal values with ``$(VAR)`` references expanded, ``fieldRef`` values from the Pod,
``secretKeyRef``/``configMapKeyRef`` and ``envFrom`` from the API. Pure functions over the Pod as a
plain manifest (camelCase dict); the API lookups are passed in.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Manifest = Mapping[str, Any]
# Returns the object's data (a Secret's values still base64-encoded, as the API serves them), or None.
Lookup = Callable[[str], Mapping[str, str] | None]

_LABEL_PATH = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class EnvResolutionError(RuntimeError):
    """The kubelet's CreateContainerConfigError: a referenced Secret, ConfigMap or key is missing."""


@dataclass(frozen=True)
class Sources:
    """Where ``secretKeyRef``/``configMapKeyRef``/``envFrom`` values come from (the Pod's namespace)."""

    secret: Lookup
    config_map: Lookup


def field_value(pod: Manifest, path: str) -> str:
    """The value of a downward-API ``fieldRef.fieldPath``; pods here run on loopback."""
    metadata, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    simple = {
        "metadata.name": metadata.get("name"),
        "metadata.namespace": metadata.get("namespace"),
        "metadata.uid": metadata.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP") or "127.0.0.1",
        "status.hostIP": status.get("hostIP") or "127.0.0.1",
    }
    if path in simple:
        return str(simple[path] or "")
    match = _LABEL_PATH.match(path)
    if match:
        return str((metadata.get(match.group(1)) or {}).get(match.group(2), ""))
    raise EnvResolutionError(f"fieldRef {path!r} is not supported by the worker-pod runner")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Expand ``$(NAME)`` from earlier variables; unknown references stay as written, ``$$`` is ``$``."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        return env.get(name, match.group(0))

    return _REFERENCE.sub(replace, value)


def _key(kind: str, data: Mapping[str, str] | None, ref: Manifest, decode: bool) -> str | None:
    name, key = ref.get("name", ""), ref["key"]
    if data is None or key not in data:
        if ref.get("optional"):
            return None
        missing = f"{kind} {name!r}" if data is None else f"key {key!r} in {kind} {name!r}"
        raise EnvResolutionError(f"{missing} not found")
    value = data[key]
    return base64.b64decode(value).decode() if decode else value


def _value_from(pod: Manifest, source: Manifest, sources: Sources) -> str | None:
    if "fieldRef" in source:
        return field_value(pod, source["fieldRef"]["fieldPath"])
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        return _key("Secret", sources.secret(ref.get("name", "")), ref, decode=True)
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        return _key("ConfigMap", sources.config_map(ref.get("name", "")), ref, decode=False)
    raise EnvResolutionError(f"valueFrom {sorted(source)} is not supported by the worker-pod runner")


def _env_from(entry: Manifest, sources: Sources) -> dict[str, str]:
    prefix = entry.get("prefix", "")
    kind, ref, lookup, decode = (
        ("Secret", entry["secretRef"], sources.secret, True)
        if "secretRef" in entry
        else ("ConfigMap", entry["configMapRef"], sources.config_map, False)
    )
    data = lookup(ref.get("name", ""))
    if data is None:
        if ref.get("optional"):
            return {}
        raise EnvResolutionError(f"{kind} {ref.get('name')!r} not found")
    return {prefix + k: (base64.b64decode(v).decode() if decode else v) for k, v in data.items()}


def container_env(pod: Manifest, container: Manifest, sources: Sources) -> dict[str, str]:
    """The container's environment in the kubelet's order: ``envFrom`` first, then ``env`` entries."""
    env: dict[str, str] = {}
    for entry in container.get("envFrom") or []:
        env.update(_env_from(entry, sources))
    for var in container.get("env") or []:
        if "valueFrom" in var:
            value = _value_from(pod, var["valueFrom"], sources)
            if value is not None:
                env[var["name"]] = value
        else:
            env[var["name"]] = expand(var.get("value", ""), env)
    return env
