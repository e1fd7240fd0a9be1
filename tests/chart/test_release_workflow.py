"""The release workflow against what docs/release.md tells users and what the chart expects.

What can drift without anyone running the workflow: the image names it pushes versus the names and
`--set` keys the docs give, the chart values its rewrite step edits, the trigger, the token's
permissions, and the version check. actionlint (`make lint`) checks the syntax and the shell.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from streamqueue_harness.controlplane import default_bin_dir

from tests.chart.helm import CHART, ROOT

WORKFLOW = yaml.safe_load((ROOT / ".github/workflows/release.yml").read_text())
DOCS = (ROOT / "docs/release.md").read_text()
JOBS: dict[str, Any] = WORKFLOW["jobs"]
# The chart value that names each image the workflow builds.
VALUES_KEY = {"operator": "image", "worker": "workerImage"}


def expand(template: str, **context: str) -> str:
    """Resolve ${{ env.X }}, ${{ matrix.X }} and ${{ needs.version.outputs.X }} in a workflow string."""

    def value(match: re.Match[str]) -> str:
        scope, _, name = match.group(1).rpartition(".")
        if scope == "env":
            return str(WORKFLOW["env"][name])
        return context[name]

    return re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", value, template)


def pushed_images() -> dict[str, str]:
    """{matrix image: reference the build step tags} with owner `<owner>` and version `X`."""
    (build,) = [s for s in JOBS["images"]["steps"] if "docker/build-push-action" in s.get("uses", "")]
    refs = {}
    for entry in JOBS["images"]["strategy"]["matrix"]["include"]:
        assert build["with"]["platforms"] == "linux/amd64,linux/arm64"
        assert (ROOT / entry["dockerfile"]).is_file()
        refs[entry["image"]] = expand(build["with"]["tags"], owner="<owner>", version="X", **entry)
    return refs


def test_pushed_images_are_the_ones_the_docs_name_with_the_chart_keys_that_select_them() -> None:
    refs = pushed_images()
    assert refs == {
        "worker": "ghcr.io/<owner>/streamqueue/worker:X",
        "operator": "ghcr.io/<owner>/streamqueue/operator:X",
    }
    for image, ref in refs.items():
        repository = ref.removesuffix(":X")
        assert f"`{repository}:0.1.0`" in DOCS  # the table of what a release publishes
        # Build-it-yourself: the same <IMAGE_REPO>/<image> naming, under the key for that image.
        assert f"--set {VALUES_KEY[image]}.repository=registry.example.com/team/{image}" in DOCS
    assert "make images IMAGE_REPO=ghcr.io/<owner>/streamqueue" in DOCS
    images_sh = (ROOT / "hack/images.sh").read_text()
    for image in refs:
        assert f'echo "$IMAGE_REPO/{image}:$VERSION"' in images_sh
    chart_push = JOBS["chart"]["steps"][-1]["run"]
    assert 'helm push "dist/streamqueue-operator-$VERSION.tgz"' in chart_push
    assert "oci://ghcr.io/<owner>/charts/streamqueue-operator --version" in DOCS
    assert WORKFLOW["env"]["CHART_NAMESPACE"] == "charts"


def test_published_chart_defaults_to_the_pushed_images(tmp_path: Path) -> None:
    """Run the workflow's rewrite step on a copy of the chart (it renders with helm and greps)."""
    (step,) = [s for s in JOBS["chart"]["steps"] if "values.yaml" in s.get("run", "")]
    version = (ROOT / "VERSION").read_text().strip()
    prefix = expand(step["env"]["PREFIX"], owner="acme")
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    env = {**os.environ, "CHART_DIR": str(chart), "PREFIX": prefix, "VERSION": version}
    env["PATH"] = f"{default_bin_dir()}:{env['PATH']}"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", step["run"]], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    values = yaml.safe_load((chart / "values.yaml").read_text())
    for image, ref in pushed_images().items():
        assert values[VALUES_KEY[image]]["repository"] == ref.removesuffix(":X").replace("<owner>", "acme")


def test_runs_on_version_tags_with_least_privilege_after_checking_the_version() -> None:
    triggers = WORKFLOW.get("on", WORKFLOW.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers["push"] == {"tags": ["v*"]}
    assert "workflow_dispatch" in triggers
    assert WORKFLOW["permissions"] == {"contents": "read"}
    for name, job in JOBS.items():
        assert set(job["permissions"].items()) <= {("contents", "read"), ("packages", "write")}, name
    check = JOBS["version"]["steps"][-1]["run"]
    for needle in ("VERSION", "Chart.yaml", "^version:", "^appVersion:", '"v$version"', "REF_NAME"):
        assert needle in check
    assert JOBS["images"]["needs"] == "version"
    assert set(JOBS["chart"]["needs"]) == {"version", "images"}
    # Publishing happens on tags only; anything else is a dry run.
    build = JOBS["images"]["steps"][-1]["with"]
    assert build["push"] == "${{ github.ref_type == 'tag' }}"
    assert build["provenance"] == "mode=max" and build["sbom"] is True
    assert JOBS["chart"]["steps"][-1]["if"] == "github.ref_type == 'tag'"
