"""The built images, inspected with whichever container engine this machine has (docs/images.md).

Skipped when there is no engine (docker with a daemon, podman or buildah). The images are built (or,
when warm, found up to date in about a second) by `hack/images.sh`, with `BASE=offline` unless the
environment says otherwise (python:3.11-slim-bookworm if it is here, else the local Debian base): a
test never tries to pull from a registry. Marked slow: a cold build takes a minute or two (half of
it mmdebstrap for the base image).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.images.test_dockerfiles import exposed, final_stage

ROOT = Path(__file__).resolve().parents[2]
VERSION = (ROOT / "VERSION").read_text().strip()
REPO = os.environ.get("IMAGE_REPO", "streamqueue")

# Bounds: the sizes measured in docs/images.md (local Debian base, engine-reported) x 1.3.
SIZE_BOUND = {"worker": 240e6, "operator": 315e6, "pause": 1e6, "gateway": 250e6}
ENTRYPOINT = {
    "worker": (["streamqueue-worker"], None),
    "operator": (["streamqueue-operator"], ["--all-namespaces"]),
    "pause": (["/catatonit", "-P"], None),
    "gateway": (
        ["streamqueue-gateway"],
        ["--config", "/etc/streamqueue-gateway/config/config.yaml", "--port", "8080"],
    ),
}

pytestmark = pytest.mark.slow


def find_engine() -> str | None:
    if os.environ.get("ENGINE"):
        return os.environ["ENGINE"]
    if shutil.which("docker"):
        answered = subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
        if answered:
            return "docker"
    for engine in ("podman", "buildah"):
        if shutil.which(engine):
            return engine
    return None


@pytest.fixture(scope="module")
def engine() -> str:
    found = find_engine()
    if found is None:
        pytest.skip("no container engine (docker daemon, podman or buildah)")
    env = {**os.environ, "ENGINE": found, "IMAGE_REPO": REPO, "VERSION": VERSION}
    env.setdefault("BASE", "offline")
    build = subprocess.run(
        ["bash", "hack/images.sh", "build"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert build.returncode == 0, build.stderr[-4000:]
    return found


def inspect(engine: str, name: str) -> tuple[dict, int]:
    """(OCI-style config with User/Entrypoint/Cmd/Env/Labels/ExposedPorts, size in bytes)."""
    image = f"{REPO}/{name}:{VERSION}"
    if engine == "buildah":
        data = json.loads(subprocess.check_output(["buildah", "inspect", "--type", "image", image]))
        config = data["OCIv1"]["config"]
        listed = json.loads(subprocess.check_output(["buildah", "images", "--json", image]))
        number, unit = listed[0]["size"].split()  # "184 MB": buildah prints SI units only
        return config, int(float(number) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit.upper()])
    (data,) = json.loads(subprocess.check_output([engine, "image", "inspect", image]))
    return data["Config"], int(data["Size"])


@pytest.mark.parametrize("name", ["worker", "operator", "pause", "gateway"])
def test_built_image_config(engine: str, name: str) -> None:
    config, size = inspect(engine, name)
    entrypoint, cmd = ENTRYPOINT[name]
    assert config.get("Entrypoint") == entrypoint
    assert (config.get("Cmd") or None) == cmd
    labels = config.get("Labels") or {}
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.title"] == f"streamqueue-{name}"
    assert len(labels["io.streamqueue.inputs"]) == 16  # the cache key hack/images.sh compares
    assert size < SIZE_BOUND[name], f"{name}: {size / 1e6:.0f} MB"
    if name == "pause":
        assert config.get("User") == "65535:65535"
        return
    assert config.get("User") == "10001:10001"
    env = dict(item.split("=", 1) for item in config.get("Env", []))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp"
    assert env["PATH"].startswith("/opt/streamqueue/bin:")
    ports = {int(port.split("/")[0]) for port in config.get("ExposedPorts") or {}}
    assert ports == exposed(f"Dockerfile.{name}")
    user = [args for op, args in final_stage(f"Dockerfile.{name}") if op == "USER"]
    assert user == [config["User"]]


@pytest.mark.parametrize("name", ["worker", "operator", "gateway"])
def test_entrypoint_starts_on_a_read_only_root_as_its_user(engine: str, name: str) -> None:
    if engine == "buildah":
        pytest.skip("buildah alone runs no containers here; podman or docker does")
    # podman: explicit limits, as this VM lacks CAP_SYS_RESOURCE (docs/images.md).
    limits = ["--ulimit", "nofile=16384:16384", "--ulimit", "nproc=8192:8192"] if engine == "podman" else []
    image = f"{REPO}/{name}:{VERSION}"
    base = [engine, "run", "--rm", "--network", "none", "--read-only", *limits]
    tmp = ["--tmpfs", "/tmp"]  # the chart's emptyDir
    out = subprocess.run([*base, *tmp, image, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: streamqueue-{name}")
    probe = "id -u; python -c 'import sys; print(sys.flags.dont_write_bytecode)'; touch /opt/x"
    out = subprocess.run(
        [*base, *tmp, "--entrypoint", "sh", image, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert out.stdout.split() == ["10001", "1"]
    assert "Read-only file system" in out.stderr


def test_export_writes_archives_named_as_the_kubelet_asks(engine: str, tmp_path: Path) -> None:
    env = {**os.environ, "ENGINE": engine, "IMAGE_REPO": REPO, "VERSION": VERSION}
    env.setdefault("BASE", "offline")
    subprocess.run(
        ["bash", "hack/images.sh", "export", str(tmp_path)], cwd=ROOT, env=env, check=True, timeout=600
    )
    names = subprocess.check_output(["bash", "hack/images.sh", "names"], cwd=ROOT, env=env, text=True).split()
    archives = ("worker", "operator", "pause", "coredns", "redis", "gateway")
    assert names == [f"docker.io/{REPO}/{name}:{VERSION}" for name in archives]
    for name, reference in zip(archives, names, strict=True):
        with tarfile.open(tmp_path / f"{name}.tar") as archive:
            manifest = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
        # docker save writes `streamqueue/worker:0.1.0`, buildah the qualified name: containerd's import
        # normalises both to the reference the kubelet asks for.
        assert reference in {qualified(tag) for tag in manifest[0]["RepoTags"]}


def qualified(tag: str) -> str:
    first = tag.split("/", 1)[0]
    if "/" not in tag:
        return f"docker.io/library/{tag}"
    return tag if "." in first or ":" in first or first == "localhost" else f"docker.io/{tag}"
