"""The release workflow against what docs/release.md tells users and what the chart expects.

What can drift without anyone running the workflow: the image names it pushes versus the names and
`--set` keys the docs give, the chart values its rewrite step edits, the trigger, the token's
permissions, the version check, the images' signing and the Python package it builds and publishes.
actionlint (`make lint`) checks the syntax and the shell.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import yaml
from streamqueue_harness.controlplane import default_bin_dir

from tests.chart.helm import CHART, ROOT

WORKFLOW = yaml.safe_load((ROOT / ".github/workflows/release.yml").read_text())
DOCS = (ROOT / "docs/release.md").read_text()
JOBS: dict[str, Any] = WORKFLOW["jobs"]
# The chart value that names each image the workflow builds.
VALUES_KEY = {"operator": "image", "worker": "workerImage", "gateway": "gateway.image"}


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
        "gateway": "ghcr.io/<owner>/streamqueue/gateway:X",
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
        key = values
        for part in VALUES_KEY[image].split("."):
            key = key[part]
        assert key["repository"] == ref.removesuffix(":X").replace("<owner>", "acme")


def test_runs_on_version_tags_with_least_privilege_after_checking_the_version() -> None:
    triggers = WORKFLOW.get("on", WORKFLOW.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers["push"] == {"tags": ["v*"]}
    assert "workflow_dispatch" in triggers
    assert WORKFLOW["permissions"] == {"contents": "read"}
    oidc = {"images", "pypi"}  # cosign keyless signing, PyPI trusted publishing
    for name, job in JOBS.items():
        allowed = {
            ("contents", "read"),
            ("packages", "write"),
            *([("id-token", "write")] if name in oidc else []),
        }
        assert set(job["permissions"].items()) <= allowed, name
    check = JOBS["version"]["steps"][-1]["run"]
    for needle in ("VERSION", "Chart.yaml", "^version:", "^appVersion:", '"v$version"', "REF_NAME"):
        assert needle in check
    assert JOBS["images"]["needs"] == "version"
    assert set(JOBS["chart"]["needs"]) == {"version", "images"}
    # Publishing happens on tags only; anything else is a dry run.
    (build,) = [s["with"] for s in JOBS["images"]["steps"] if s.get("id") == "build"]
    assert build["push"] == "${{ github.ref_type == 'tag' }}"
    assert build["provenance"] == "mode=max" and build["sbom"] is True
    assert JOBS["chart"]["steps"][-1]["if"] == "github.ref_type == 'tag'"


def step(job: str, uses_or_name: str) -> dict[str, Any]:
    """The one step of ``job`` that uses the action ``uses_or_name`` (a prefix) or has that name."""
    steps = JOBS[job]["steps"]
    (found,) = [
        s for s in steps if s.get("uses", "").startswith(uses_or_name) or s.get("name") == uses_or_name
    ]
    return found


def test_images_are_signed_keyless_by_digest_after_the_push_on_tags_only() -> None:
    steps = JOBS["images"]["steps"]
    installer, sign = step("images", "sigstore/cosign-installer@"), step("images", "Sign")
    assert (
        steps.index(step("images", "docker/build-push-action@")) < steps.index(installer) < steps.index(sign)
    )
    assert installer["if"] == sign["if"] == "github.ref_type == 'tag'"
    assert JOBS["images"]["permissions"]["id-token"] == "write"
    # Keyless: no key, no password; by the digest build-push-action reports, never by tag.
    assert sign["run"] == 'cosign sign --yes "$IMAGE@$DIGEST"'
    assert sign["env"]["DIGEST"] == "${{ steps.build.outputs.digest }}"
    image = expand(sign["env"]["IMAGE"], owner="<owner>", image="worker")
    assert f"{image}:X" == pushed_images()["worker"]
    assert not any("key" in k.lower() or "password" in k.lower() for k in sign.get("env", {}))


def test_the_python_package_is_built_from_worker_and_published_last_by_trusted_publishing() -> None:
    package_dir = ROOT / WORKFLOW["env"]["PACKAGE_DIR"]
    project = tomllib.loads((package_dir / "pyproject.toml").read_text())["project"]
    assert project["name"] == "streamqueue"
    build = step("python", "Build the wheel and sdist")["run"]
    assert 'python -m build --outdir dist "$PACKAGE_DIR"' in build
    # The version check reads the package's version as pyproject.toml holds it: VERSION's.
    version_line = build.splitlines()[0]
    env = {**os.environ, "PACKAGE_DIR": str(package_dir)}
    read = subprocess.run(
        ["bash", "-c", f'{version_line}; echo "$package_version"'], env=env, capture_output=True, text=True
    )
    assert read.stdout.strip() == project["version"] == (ROOT / "VERSION").read_text().strip()
    for script in ("kubectl-sq", "streamqueue-worker"):  # what the build step checks the wheel for
        assert script in project["scripts"] and script in build
    assert step("python", "actions/upload-artifact@")["with"]["name"] == "python-dist"

    pypi = JOBS["pypi"]
    assert pypi["if"] == "github.ref_type == 'tag'"
    assert set(pypi["needs"]) == {"version", "python", "chart"}  # after the images and the chart
    assert pypi["permissions"] == {"id-token": "write"} and pypi["environment"]["name"] == "pypi"
    assert step("pypi", "actions/download-artifact@")["with"]["name"] == "python-dist"
    publish = step("pypi", "pypa/gh-action-pypi-publish@")
    assert not publish.get("with", {}).get("password")  # trusted publishing: no API token


def test_the_changelog_keeps_an_unreleased_section_with_upgrade_notes() -> None:
    """Keep a Changelog: an Unreleased section on top, whose upgrade notes point at docs/upgrading.md,
    then one section per version, each with its link; the current VERSION is released or unreleased."""
    changelog = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[([^\]]+)\]", changelog, flags=re.MULTILINE)
    assert versions[0] == "Unreleased"
    unreleased = changelog.split("\n## [", 2)[1]
    assert "### Upgrade notes" in unreleased and "(docs/upgrading.md)" in unreleased
    for version in versions:
        assert re.search(rf"^\[{re.escape(version)}\]: https://", changelog, flags=re.MULTILINE), version
    assert (ROOT / "VERSION").read_text().strip() in versions
