"""WorkerSettings: the env names the operator renders, CLI flags, defaults and range checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp
from streamqueue import wire
from streamqueue.settings import ECHO_HANDLER, HTTP_HANDLER, WorkerSettings

# Exactly what the operator sets in the worker pod (see operator/streamqueue_operator/deployment.py).
OPERATOR_ENV = {
    "STREAMQUEUE_REDIS_URL": ("redis_url", "redis://redis:6379/1", "redis://redis:6379/1"),
    "STREAMQUEUE_REDIS_USERNAME": ("redis_username", "svc", "svc"),
    "STREAMQUEUE_REDIS_TLS": ("redis_tls", "true", True),
    "STREAMQUEUE_REDIS_TLS_CA_FILE": ("redis_tls_ca_file", "/etc/ca/ca.crt", "/etc/ca/ca.crt"),
    "STREAMQUEUE_STREAM": ("stream", "jobs", "jobs"),
    "STREAMQUEUE_GROUP": ("group", "workers", "workers"),
    "STREAMQUEUE_CONSUMER": ("consumer", "pod-abc", "pod-abc"),
    "STREAMQUEUE_REPLY_PREFIX": ("reply_prefix", "out:", "out:"),
    "STREAMQUEUE_HANDLER": ("handler", "pkg.mod:fn", "pkg.mod:fn"),
    "STREAMQUEUE_HANDLER_URL": ("handler_url", "http://model:8000/", "http://model:8000/"),
    "STREAMQUEUE_HANDLER_TIMEOUT_SECONDS": ("handler_timeout_seconds", "12.5", 12.5),
    "STREAMQUEUE_HANDLER_RETRIES": ("handler_retries", "4", 4),
    "STREAMQUEUE_BATCH_SIZE": ("batch_size", "25", 25),
    "STREAMQUEUE_CONCURRENCY": ("concurrency", "300", 300),
    "STREAMQUEUE_BLOCK_MS": ("block_ms", "7000", 7000),
    "STREAMQUEUE_CLAIM_IDLE_MS": ("claim_idle_ms", "45000", 45000),
    "STREAMQUEUE_MAX_DELIVERIES": ("max_deliveries", "9", 9),
    "STREAMQUEUE_DEAD_LETTER_STREAM": ("dead_letter_stream", "jobs:poison", "jobs:poison"),
    "STREAMQUEUE_ERROR_REPLIES": ("error_replies", "false", False),
    "STREAMQUEUE_STREAM_REPLIES": ("stream_replies", "false", False),
    "STREAMQUEUE_REPLY_MAXLEN": ("reply_maxlen", "50", 50),
    "STREAMQUEUE_REPLY_TTL_SECONDS": ("reply_ttl_seconds", "600", 600),
    "STREAMQUEUE_MAX_MESSAGE_BYTES": ("max_message_bytes", "2048", 2048),
    "STREAMQUEUE_SHUTDOWN_GRACE_SECONDS": ("shutdown_grace_seconds", "45", 45),
    "STREAMQUEUE_HEALTH_PORT": ("health_port", "9090", 9090),
    "STREAMQUEUE_LOG_LEVEL": ("log_level", "warning", "WARNING"),
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("STREAMQUEUE_") or name == "POD_NAME":
            monkeypatch.delenv(name)


def test_defaults_are_the_articles_names() -> None:
    s = WorkerSettings()
    assert (s.stream, s.group, s.reply_prefix) == (
        wire.DEFAULT_STREAM,
        wire.DEFAULT_GROUP,
        wire.DEFAULT_REPLY_PREFIX,
    )
    assert s.dead_letter() == "user_messages_queue:dead"
    assert s.handler == ECHO_HANDLER
    assert s.health_port == 8080


def test_every_operator_env_var_is_read(monkeypatch) -> None:
    for name, (_, text, _) in OPERATOR_ENV.items():
        monkeypatch.setenv(name, text)
    s = WorkerSettings()
    for field, _, expected in OPERATOR_ENV.values():
        value = getattr(s, field)
        assert (str(value) if field == "redis_tls_ca_file" else value) == expected, field


def test_password_comes_from_env_and_is_hidden(monkeypatch) -> None:
    monkeypatch.setenv("STREAMQUEUE_REDIS_PASSWORD", "hunter2")
    s = WorkerSettings()
    assert s.redis_connection().password_text() == "hunter2"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)


def test_consumer_defaults_to_pod_name(monkeypatch) -> None:
    monkeypatch.setenv("POD_NAME", "queue-workers-7d9f-abcde")
    assert WorkerSettings().consumer == "queue-workers-7d9f-abcde"
    monkeypatch.delenv("POD_NAME")
    assert WorkerSettings().consumer  # the host name


def test_handler_url_alone_selects_the_http_handler() -> None:
    assert WorkerSettings(handler_url="http://x/").handler == HTTP_HANDLER
    assert WorkerSettings(handler_url="http://x/", handler="m:f").handler == "m:f"


def test_cli_flags_override_env(monkeypatch) -> None:
    monkeypatch.setenv("STREAMQUEUE_BATCH_SIZE", "5")
    s = CliApp.run(
        WorkerSettings, cli_args=["--batch-size", "9", "--no-error-replies", "--dead-letter-stream", "dl"]
    )
    assert (s.batch_size, s.error_replies, s.dead_letter()) == (9, False, "dl")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"concurrency": 0}, "concurrency"),
        ({"block_ms": 60_001}, "block_ms"),
        ({"claim_idle_ms": 10}, "claim_idle_ms"),
        ({"max_deliveries": 0}, "max_deliveries"),
        ({"health_port": 70_000}, "health_port"),
        ({"log_level": "chatty"}, "log_level"),
        ({"handler": "no_colon"}, "handler\n.*should match pattern"),
        ({"handler_url": "not a url"}, "handler_url\n.*should match pattern"),
        ({"openai_base_url": "ftp://x/v1"}, "openai_base_url\n.*should match pattern"),
        ({"fairness": "perUser", "stream": "q{"}, "hash tag"),
        ({"dead_letter_stream": "user_messages_queue"}, "must differ"),
        ({"partitions": 4, "dead_letter_stream": "user_messages_queue:{3}"}, "every partition stream"),
        ({"reply_prefix": "user_"}, "reply_prefix"),
        ({"redis_url": "http://localhost:6379"}, "redis://"),
        ({"redis_password": "a", "redis_password_file": "/tmp/p"}, "not both"),
    ],
)
def test_invalid_values_are_rejected_clearly(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        WorkerSettings(**overrides)


def test_a_dead_letter_stream_may_look_like_a_partition_that_does_not_exist() -> None:
    """Only the partitions the queue reads are refused (``wire.partition_stream``)."""
    assert WorkerSettings(partitions=4, dead_letter_stream="user_messages_queue:{4}")
    assert WorkerSettings(partitions=4, dead_letter_stream="user_messages_queue:{03}")
    assert WorkerSettings(dead_letter_stream="user_messages_queue:{0}")  # one partition: the stream itself


def test_docs_list_every_setting() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "worker.md").read_text()
    missing = [f"STREAMQUEUE_{name.upper()}" for name in WorkerSettings.model_fields]
    missing = [var for var in missing if f"`{var}`" not in docs]
    assert not missing, f"docs/worker.md does not describe {missing}"
