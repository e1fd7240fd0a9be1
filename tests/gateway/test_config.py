"""The gateway's configuration file and command line: camelCase YAML checked strictly, the Redis
password kept out of the file, and the ``streamqueue-gateway`` command serving probes and metrics."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from streamqueue_gateway.config import CONFIG_ENV, PASSWORD_ENV, GatewayConfig, load_config
from streamqueue_harness.eventually import eventually
from streamqueue_harness.ports import free_port
from streamqueue_harness.processes import spawn, stop_groups

CLI = [sys.executable, "-m", "streamqueue_gateway"]
CONTRACT_EXAMPLE = """
redis:
  url: redis://redis:6379/0
models:
  - name: llama
    stream: user_messages_queue
    partitions: 1
    group: ai_service_group
    replyPrefix: "ai_to_user:"
    maxBacklog: 1000
auth:
  apiKeysFile: /etc/streamqueue-gateway/api-keys/keys.json
  defaultTier: free
tiers:
  free: {maxRequests: 2, tokensPerMinute: 20000, tierMaxRequests: 0, tierTokensPerMinute: 0}
requestTimeoutSeconds: 120
resumeGraceSeconds: 10
"""


def test_the_documented_example_loads_from_a_file_or_the_environment(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONTRACT_EXAMPLE)
    config = load_config(path)
    assert config.models[0].reply_prefix == "ai_to_user:" and config.tiers["free"].tokens_per_minute == 20000
    assert config.resume_grace_seconds == 10 and config.auth.api_keys_file is not None
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert load_config() == config


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"requestTimeout": 5}, "Extra inputs"),  # a misspelt key fails, not ignored
        ({"redis": {"url": "redis://:secret@redis:6379/0"}}, "password"),
        ({"models": []}, "at least 1"),
        ({"models": [{"name": "a"}, {"name": "a"}]}, "unique"),
        ({"models": [{"name": "a b"}]}, "pattern"),
    ],
)
def test_mistakes_fail_at_start_up(change: dict, complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        GatewayConfig.model_validate(yaml.safe_load(CONTRACT_EXAMPLE) | change)


@pytest.mark.parametrize(
    ("grace", "retry", "valid"),
    [
        (10, None, True),
        (3, None, True),
        (2.9, None, False),
        (1, None, False),
        (1, 0.3, True),
        (1, 0.5, False),
    ],
)
def test_the_resume_grace_outlasts_three_browser_reconnect_delays(
    grace: float, retry: float | None, valid: bool
) -> None:
    """A grace of 1 s with the default 1 s ``retry:`` cancelled streams the browser was resuming."""
    values = yaml.safe_load(CONTRACT_EXAMPLE) | {"resumeGraceSeconds": grace}
    if retry is not None:
        values["sseRetrySeconds"] = retry
    if valid:
        config = GatewayConfig.model_validate(values)
        assert config.sse_retry == f"retry: {round((retry or 1) * 1000)}\n\n".encode()
    else:
        with pytest.raises(ValidationError, match="at least 3 x sseRetrySeconds"):
            GatewayConfig.model_validate(values)


def test_the_redis_password_comes_from_the_environment_unless_a_file_is_given(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    config = GatewayConfig.model_validate(yaml.safe_load(CONTRACT_EXAMPLE))
    assert config.redis.connection().password_text() == "from-env"
    secret = tmp_path / "password"
    secret.write_text("from-file\n")
    with_file = config.model_copy(update={"redis": config.redis.model_copy(update={"password_file": secret})})
    assert with_file.redis.connection().password_text() == "from-file"
    assert "from-env" not in repr(config)


def test_the_command_has_help_and_refuses_to_start_without_a_config(monkeypatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    helped = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60, check=True)
    assert "--config" in helped.stdout and "hash-key" in helped.stdout
    refused = subprocess.run(CLI, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and CONFIG_ENV in refused.stderr
    hashed = subprocess.run([*CLI, "hash-key"], input="sk-1\n", capture_output=True, text=True, timeout=60)
    assert hashed.stdout.strip() == hashlib.sha256(b"sk-1").hexdigest()


def test_the_command_serves_probes_and_metrics(redis_server, keys_file: Path, tmp_path: Path) -> None:
    config = yaml.safe_load(CONTRACT_EXAMPLE)
    config["redis"]["url"] = redis_server.url
    config["auth"]["apiKeysFile"] = str(keys_file)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = spawn(
        [*CLI, "--config", str(path), "--host", "127.0.0.1", "--port", str(port)], log=tmp_path / "gw.log"
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def answers(path: str) -> str | None:
            assert proc.poll() is None, (tmp_path / "gw.log").read_text()
            try:
                with urllib.request.urlopen(base + path, timeout=5) as response:
                    return response.read().decode()
            except OSError:
                return None

        assert eventually(lambda: answers("/healthz"), "/healthz") == "ok"
        assert answers("/readyz") == "ok"
        assert "streamqueue_gateway_requests_total" in (answers("/metrics") or "")
    finally:
        stop_groups([(proc.pid, proc)], grace=10)
