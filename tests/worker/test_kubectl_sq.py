"""``kubectl sq``'s pure parts: argument round trips, durations, tables, redaction, the tool pod."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import yaml
from streamqueue.kubectl_sq import kube, reach, render
from streamqueue.kubectl_sq.cli import parser as plugin_parser
from streamqueue.kubectl_sq.report import REDACTED, redact
from streamqueue.sqtool.args import dlq_argv, duration
from streamqueue.sqtool.args import parser as tool_parser
from streamqueue_operator import decide


@pytest.mark.parametrize(
    "argv",
    [
        ["dlq", "list"],
        ["dlq", "show", "1-0"],
        ["dlq", "list", "--reason", "max_deliveries_exceeded", "--user", "ada", "--older-than", "1h"],
        ["dlq", "redrive", "--newer-than", "90", "--id", "1-0", "--id", "2-0", "--dry-run"],
        ["dlq", "purge", "--all", "--limit", "10"],
    ],
)
def test_the_plugins_dlq_arguments_reach_the_tool_unchanged(argv: list[str]) -> None:
    """``kubectl sq dlq ... NAME`` parses into what ``python -m streamqueue.sqtool`` is given."""
    plugin = plugin_parser().parse_args([*argv[:2], "chat", *argv[2:]])
    tool = tool_parser().parse_args(dlq_argv(plugin))
    assert tool == tool_parser().parse_args(argv)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1.5d", 129_600)]
)
def test_durations(text: str, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1w", "-5m", "m"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


def test_options_go_before_or_after_the_command() -> None:
    before = plugin_parser().parse_args(["-n", "prod", "-o", "json", "status", "chat"])
    after = plugin_parser().parse_args(["status", "chat", "-n", "prod", "-o", "json"])
    assert vars(before) == vars(after)


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["status"], ["pause"], ["resume"], ["drain"], ["report"], ["dlq"], ["dlq", "redrive"]):
        with pytest.raises(SystemExit) as exited:
            plugin_parser().parse_args([*argv, "--help"])
        assert exited.value.code == 0
        assert "usage: kubectl sq" in capsys.readouterr().out


def test_the_pause_annotations_are_the_operators() -> None:
    assert (kube.PAUSED, kube.PAUSED_REPLICAS) == (decide.PAUSED, decide.PAUSED_REPLICAS)


def test_a_table_aligns_its_columns_and_shows_none_as_a_dash() -> None:
    assert render.table(["A", "LONGER"], [["xyz", None], [1, 2]]).splitlines() == [
        "A     LONGER",
        "xyz   -",
        "1     2",
    ]


@pytest.mark.parametrize(
    ("seconds", "shown"), [(5, "5s"), (90, "1m"), (7199, "119m"), (7200, "2h"), (200_000, "2d")]
)
def test_ages_read_like_kubectls(seconds: float, shown: str) -> None:
    assert render.age(seconds) == shown


def test_a_report_redacts_secret_values_and_url_passwords_and_keeps_the_rest() -> None:
    env = [
        {"name": "STREAMQUEUE_REDIS_URL", "value": "redis://app:s3cret@redis:6379/0"},
        {"name": "MODEL_API_KEY", "value": "sk-123"},
        {"name": "STREAMQUEUE_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "redis", "key": "pw"}}},
        {"name": "STREAMQUEUE_STREAM", "value": "chat"},
    ]
    meta = {"managedFields": [{"manager": "kubectl"}], "name": "chat"}
    out = redact({"metadata": meta, "env": env})
    assert "s3cret" not in str(out) and "sk-123" not in str(out)
    assert out["env"][1]["value"] == REDACTED
    assert out["env"][2] == env[2] and out["env"][3] == env[3]  # references and plain settings stay
    assert out["metadata"] == {"name": "chat"}


def test_the_tool_pod_is_the_worker_template_without_labels_probes_or_the_worker_command() -> None:
    worker = {
        "name": "worker", "image": "streamqueue/worker:0.1.0", "imagePullPolicy": "Never",
        "env": [{"name": "STREAMQUEUE_STREAM", "value": "chat"}],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "livenessProbe": {}, "ports": [{"containerPort": 8080}], "securityContext": {"runAsNonRoot": True},
    }  # fmt: skip
    template = {
        "metadata": {"labels": {kube.QUEUE_LABEL: "chat"}},
        "spec": {
            "containers": [worker],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
            "serviceAccountName": "sa",
        },
    }
    queue = kube.Queue("chat", "prod", {"metadata": {}}, {"spec": {"template": template}})
    spec = reach.tool_pod_spec(queue, "chat-sq-1", ["status"], None)
    [container] = spec["containers"]
    assert container["command"] == reach.SQTOOL and container["args"] == ["status"]
    assert container["env"] == worker["env"] and container["imagePullPolicy"] == "Never"
    assert "livenessProbe" not in container and "ports" not in container
    assert spec["restartPolicy"] == "Never" and spec["serviceAccountName"] == "sa"
    assert spec["volumes"] == template["spec"]["volumes"]
    assert "metadata" not in spec  # no labels: the queue's ReplicaSet must not adopt the pod


def test_the_tool_secret_replaces_the_workers_redis_user_in_the_pod() -> None:
    """The flag first, else the StreamQueue's annotation; the worker's user, password and password file
    give way to the Secret's keys, every other variable stays."""
    stream = {"name": "STREAMQUEUE_STREAM", "value": "chat"}
    worker = {
        "name": "worker", "image": "w",
        "env": [
            stream, {"name": "STREAMQUEUE_REDIS_USERNAME", "value": "sq-worker"},
            {"name": "STREAMQUEUE_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "w", "key": "pw"}}},
            {"name": "STREAMQUEUE_REDIS_PASSWORD_FILE", "value": "/etc/redis/pw"},
        ],
    }  # fmt: skip
    obj = {"metadata": {"annotations": {kube.TOOL_REDIS_SECRET: "chat-sq-tool"}}}
    queue = kube.Queue("chat", "prod", obj, {"spec": {"template": {"spec": {"containers": [worker]}}}})
    assert reach.tool_secret(queue, None) == "chat-sq-tool"
    assert reach.tool_secret(queue, "other") == "other"
    assert reach.tool_secret(kube.Queue("chat", "prod", {"metadata": {}}, None), None) is None
    [container] = reach.tool_pod_spec(queue, "chat-sq-1", ["status"], "chat-sq-tool")["containers"]

    def from_secret(name: str, key: str) -> dict[str, object]:
        return {"name": name, "valueFrom": {"secretKeyRef": {"name": "chat-sq-tool", "key": key}}}

    assert container["env"] == [
        stream,
        from_secret("STREAMQUEUE_REDIS_USERNAME", "username"),
        from_secret("STREAMQUEUE_REDIS_PASSWORD", "password"),
    ]
    [unchanged] = reach.tool_pod_spec(queue, "chat-sq-1", ["status"], None)["containers"]
    assert unchanged["env"] == worker["env"]


def test_the_tools_answer_is_found_among_kubectls_lines() -> None:
    assert reach.parse_output('If you don\'t see a command prompt...\n{"backlog": 3}\npod "x" deleted\n') == {
        "backlog": 3
    }
    with pytest.raises(reach.SqtoolError, match="NOGROUP"):
        reach.parse_output('{"error": "ResponseError: NOGROUP"}\n')
    with pytest.raises(reach.SqtoolError, match="ImagePullBackOff"):
        reach.parse_output("error: ImagePullBackOff")


def test_the_krew_manifest_installs_the_shim_at_the_projects_version() -> None:
    root = Path(__file__).parents[2]
    manifest = yaml.safe_load((root / "plugins" / "krew" / "sq.yaml").read_text())
    assert (manifest["kind"], manifest["metadata"]["name"]) == ("Plugin", "sq")
    version = (root / "VERSION").read_text().strip()
    assert (
        manifest["spec"]["version"] == f"v{version}"
        and f"streamqueue=={version}" in manifest["spec"]["caveats"]
    )
    [platform] = manifest["spec"]["platforms"]
    shim = root / "plugins" / "krew" / platform["files"][0]["from"]
    assert platform["bin"] == "kubectl-sq" and os.access(shim, os.X_OK)
    assert 'python3}" -m streamqueue.kubectl_sq' in shim.read_text()
