"""The Dockerfiles checked against the repository they build from, without a container engine.

What can be checked without building: what they copy exists and is not docker-ignored, the
entrypoint is a console script of what they install, the pins the tests ran with constrain every
runtime dependency, the build can run with no network (wheelhouse) and needs no registry beyond the
base image (no `# syntax=` frontend), and the user, ports and filesystem expectations agree with the
pods the chart and the operator create. test_built_images.py checks the built images themselves.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from streamqueue.settings import DEFAULT_HEALTH_PORT

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {
    "Dockerfile.worker": ["worker"],
    "Dockerfile.operator": ["worker", "operator"],
    "Dockerfile.gateway": ["worker", "gateway"],
}
VALUES = yaml.safe_load((ROOT / "charts/streamqueue-operator/values.yaml").read_text())


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / dockerfile).read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for line in lines
        if line and not line.startswith("#")
        for parts in [line.split(None, 1)]
    ]


def final_stage(dockerfile: str) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def dockerignored(path: str) -> bool:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().split() if not p.startswith("#")]
    return any(fnmatch.fnmatch(path, p.removeprefix("**/")) or path.startswith(p + "/") for p in patterns)


def project(folder: str) -> dict:
    return tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_copies_exist_and_reach_the_build_context(dockerfile: str) -> None:
    copies = [args.split() for op, args in instructions(dockerfile) if op == "COPY" and "--from" not in args]
    assert copies
    for *sources, _destination in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not dockerignored(source.rstrip("/")), source
    copied = {s.rstrip("/") for *sources, _ in copies for s in sources}
    assert set(IMAGES[dockerfile]) <= copied


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_entrypoint_is_a_console_script_of_what_it_installs(dockerfile: str) -> None:
    (entrypoint,) = [yaml.safe_load(args) for op, args in final_stage(dockerfile) if op == "ENTRYPOINT"]
    scripts = {name for folder in IMAGES[dockerfile] for name in project(folder).get("scripts", {})}
    assert entrypoint[0] in scripts
    build = " ".join(args for op, args in instructions(dockerfile) if op == "RUN")
    assert f"{entrypoint[0]} --help" in build  # the build fails if the installed script cannot start


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_runtime_dependencies_are_constrained_by_the_tested_pins(dockerfile: str) -> None:
    pins = {
        line.split("==")[0].lower()
        for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    own = {project(folder)["name"] for folder in IMAGES[dockerfile]}
    for folder in IMAGES[dockerfile]:
        for requirement in project(folder)["dependencies"]:
            name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()
            assert name in pins or name in own, f"{folder}: {name} is not pinned in requirements-dev.txt"
    build = " ".join(args for op, args in instructions(dockerfile) if op == "RUN")
    assert "--constraint /src/requirements-dev.txt" in build


@pytest.mark.parametrize("dockerfile", ["Dockerfile.worker", "Dockerfile.gateway"])
def test_the_worker_and_gateway_images_run_on_uvloop(dockerfile: str) -> None:
    """The figures in docs/benchmarks.md are these processes' on uvloop (``streamqueue.aio.run``): the
    image installs the extra (its pin tested like the rest), and its build fails without uvloop."""
    (requirement,) = project("worker")["optional-dependencies"]["uvloop"]
    assert "uvloop==" in (ROOT / "requirements-dev.txt").read_text() and requirement.startswith("uvloop")
    build = " ".join(args for op, args in instructions(dockerfile) if op == "RUN")
    assert '"/src/worker[uvloop]"' in build and "import uvloop" in build


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_runs_as_a_numeric_non_root_user_with_nothing_to_write_outside_tmp(dockerfile: str) -> None:
    """Numeric, so the kubelet can enforce runAsNonRoot; HOME and TMPDIR on the /tmp emptyDir."""
    stage = final_stage(dockerfile)
    (user,) = [args for op, args in stage if op == "USER"]
    uid, gid = (int(x) for x in user.split(":"))
    assert uid > 0 and gid > 0
    env = " ".join(args for op, args in stage if op == "ENV")
    for variable in ("HOME=/tmp", "TMPDIR=/tmp", "PYTHONDONTWRITEBYTECODE=1"):
        assert variable in env, variable
    if dockerfile in ("Dockerfile.operator", "Dockerfile.gateway"):  # the chart's pods
        assert VALUES["podSecurityContext"]["runAsUser"] == uid


def exposed(dockerfile: str) -> set[int]:
    return {int(port) for op, args in final_stage(dockerfile) if op == "EXPOSE" for port in args.split()}


def test_exposed_ports_are_the_defaults_the_pods_use() -> None:
    assert exposed("Dockerfile.worker") == {DEFAULT_HEALTH_PORT}  # the operator renders the same default
    assert exposed("Dockerfile.operator") == {VALUES["metrics"]["port"], VALUES["liveness"]["port"]}
    assert exposed("Dockerfile.gateway") == {VALUES["gateway"]["port"]}  # API, probes and /metrics


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_builds_need_no_registry_but_the_base_image(dockerfile: str) -> None:
    """A `# syntax=` line makes BuildKit pull its frontend from a registry; the base is a build arg."""
    text = (ROOT / dockerfile).read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, flags=re.MULTILINE | re.IGNORECASE)
    froms = [args.split()[0] for op, args in instructions(dockerfile) if op == "FROM"]
    assert froms == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm") in instructions(dockerfile)


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_can_install_from_the_wheelhouse_alone(dockerfile: str) -> None:
    """WHEELS_ONLY=1 installs with --no-index from wheelhouse/, which is always in the context."""
    steps = instructions(dockerfile)
    assert ("COPY", "wheelhouse/ /src/wheelhouse/") in steps
    assert ("ARG", "WHEELS_ONLY=0") in steps
    (install,) = [args for op, args in steps if op == "RUN" and "pip install" in args]
    assert '[ "$WHEELS_ONLY" = 1 ]' in install and "--no-index" in install
    assert "--find-links /src/wheelhouse" in install
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "wheelhouse/*" in ignored and "!wheelhouse/README.md" in ignored
