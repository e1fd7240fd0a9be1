"""The generated CRD matches the models, and its schema is structural (Kubernetes accepts it)."""

from __future__ import annotations

from typing import Any

from streamqueue_operator import crdgen, models


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(node, dict):
        return []
    out = [(path, node)]
    for key, value in node.get("properties", {}).items():
        out += _walk(value, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        out += _walk(node["items"], f"{path}[]")
    return out


def test_generated_copies_match_the_models() -> None:
    """Fails when crds/ or the chart's crds/ drift from models.py: run `make crds`."""
    assert crdgen.stale_outputs(crdgen.render()) == []
    assert crdgen.main(["--check"]) == 0


def test_check_reports_a_stale_copy(tmp_path, monkeypatch) -> None:
    stale = tmp_path / "crd.yaml"
    stale.write_text("old")
    monkeypatch.setattr(crdgen, "OUTPUTS", (stale,))
    assert crdgen.main(["--check"]) == 1


def test_schema_is_structural() -> None:
    version = crdgen.build_crd()["spec"]["versions"][0]
    for path, node in _walk(version["schema"]["openAPIV3Schema"]):
        assert not {"$ref", "$defs", "anyOf", "allOf", "title"} & node.keys(), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert node.get("additionalProperties") is not True, path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(bound, True) is True, f"{path}: Kubernetes wants a boolean {bound}"


def test_nested_objects_default_so_an_empty_spec_gets_every_default() -> None:
    spec = crdgen.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["default"] == {}
    for section in ("redis", "worker", "scaling", "housekeeping"):
        assert isinstance(spec["properties"][section]["default"], dict), section
    # Spelled out, because the API server checks a default against the section's CEL rules as is.
    assert spec["properties"]["scaling"]["default"]["minReplicas"] == 1
    scaling = spec["properties"]["scaling"]["properties"]
    assert scaling["pollIntervalSeconds"]["default"] == 1.0
    assert scaling["minReplicas"]["minimum"] == 0


def test_printer_columns_and_status_subresource() -> None:
    version = crdgen.build_crd()["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Stream",
        "Backlog",
        "Pending",
        "Replicas",
        "Ready",
        "Age",
    ]
    assert version["subresources"] == {"status": {}}


def test_versions_share_one_schema_and_the_operator_s_version_is_stored() -> None:
    """Conversion strategy None is only sound when every served version has the same schema."""
    crd = crdgen.build_crd()["spec"]
    versions = {v["name"]: v for v in crd["versions"]}
    assert list(versions) == ["v1alpha1", "v1beta1"]
    assert crd["conversion"] == {"strategy": "None"}
    assert [name for name, v in versions.items() if v["storage"]] == [models.VERSION] == ["v1beta1"]
    assert all(v["served"] for v in versions.values())
    first, *others = versions.values()
    for other in others:
        assert {**other, "name": "", "storage": False} == {**first, "name": "", "storage": False}
