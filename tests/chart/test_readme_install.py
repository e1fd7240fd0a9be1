"""The README's install lines, run as written against the real control plane and the operator.

Only `helm install` is replaced (by the CRD fixture and the operator started for the test namespace,
as every operator test does: there is no node here to run the chart's Deployment); each kubectl line
is the README's own text, run with a kubeconfig whose current namespace is the test's. There is no
DNS for Services here, so the operator cannot reach `redis://redis:6379/0`: the test checks what
the README promises up to that point, that the queue is created, refers to the Secret the README
creates, the operator reads that Secret and gets as far as dialling Redis, and the worker pods get
the password from it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from streamqueue_harness.eventually import eventually
from streamqueue_harness.operatorproc import OperatorProcess

from tests.chart.helm import ROOT

pytestmark = pytest.mark.kube

SECRET_REF = {"name": "redis-auth", "key": "password"}


def install_lines() -> list[str]:
    """The commands of the README's first code block under "Install (on a cluster)"."""
    section = (ROOT / "README.md").read_text().split("## Install (on a cluster)", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


def namespaced_kubeconfig(control_plane: Any, namespace: str, tmp_path: Path) -> Path:
    """The admin kubeconfig with ``namespace`` as the current context's namespace."""
    path = tmp_path / "kubeconfig"
    shutil.copy(control_plane.kubeconfig, path)
    control_plane.kubectl(
        "config", "set-context", "--current", f"--namespace={namespace}", f"--kubeconfig={path}"
    )
    return path


def test_the_readme_install_lines_bring_up_the_example_queue_with_its_password_secret(
    control_plane, kube_namespace: str, streamqueue_crd, tmp_path: Path
) -> None:
    helm_line, *kubectl_lines = install_lines()
    assert helm_line.startswith("helm install streamqueue charts/streamqueue-operator")
    operator = OperatorProcess(control_plane.kubeconfig, f"--namespace={kube_namespace}", tmp_path).start()
    try:
        check_install(control_plane, kube_namespace, tmp_path, kubectl_lines)
    finally:
        operator.stop()


def check_install(control_plane: Any, kube_namespace: str, tmp_path: Path, kubectl_lines: list[str]) -> None:
    """Run the README's kubectl lines, then check the queue, its Secret and its workers' password."""
    env = {**os.environ, "KUBECONFIG": str(namespaced_kubeconfig(control_plane, kube_namespace, tmp_path))}
    assert len(kubectl_lines) >= 4
    for line in kubectl_lines:
        command, *args = shlex.split(line, comments=True)
        assert command == "kubectl", line
        result = subprocess.run(
            [str(control_plane.bin_dir / "kubectl"), *args], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"

    def get(*what: str) -> dict[str, Any]:
        return json.loads(control_plane.kubectl("get", *what, "-n", kube_namespace, "-o", "json").stdout)

    secret = get("secret", "redis-auth")
    assert base64.b64decode(secret["data"]["password"]).decode() == "<redis password>"  # the README's text
    assert get("streamqueue", "chat")["spec"]["redis"]["passwordSecretRef"] == SECRET_REF

    def redis_condition() -> dict[str, Any] | None:
        conditions = get("streamqueue", "chat").get("status", {}).get("conditions", [])
        found = [
            c for c in conditions if c["type"] == "RedisReachable" and re.search("Secret|svc", c["message"])
        ]
        return found[0] if found else None

    condition = eventually(redis_condition, "the operator's RedisReachable condition", timeout=60)
    # Past the Secret (a missing one reads "cannot read Secret ..."), dialling the Service's name.
    assert "Secret" not in condition["message"]
    assert f"redis.{kube_namespace}.svc" in condition["message"]

    def password_env() -> dict[str, Any] | None:
        try:
            (container,) = get("deployment", "chat-worker")["spec"]["template"]["spec"]["containers"]
        except subprocess.CalledProcessError:
            return None
        return next((e for e in container["env"] if e["name"] == "STREAMQUEUE_REDIS_PASSWORD"), None)

    env_var = eventually(password_env, "the worker Deployment's password variable", timeout=60)
    assert env_var == {"name": "STREAMQUEUE_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": SECRET_REF}}
