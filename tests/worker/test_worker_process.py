"""Worker processes (``python -m streamqueue.worker``, env only) under SIGKILL and SIGTERM.

The handler is the harness's demo handler (echo after ``STREAMQUEUE_DEMO_DELAY_MS``), so a batch is
still in flight when the signal lands.
"""

from __future__ import annotations

import signal
import subprocess

import pytest
from streamqueue_harness.eventually import eventually
from streamqueue_harness.redis_server import RedisServer
from streamqueue_harness.workerproc import WORKER_COMMAND

from tests.worker.conftest import (
    GROUP,
    STREAM,
    WorkerProcesses,
    answered_request_ids,
    group_settled,
    has_group,
    send,
)

SLOW_HANDLER = {"handler": "streamqueue_harness.demo_handler:handle", "demo_delay_ms": "300"}
USERS = [f"u{i}" for i in range(10)]


def _send_requests(raw, count: int) -> list[str]:
    ids = []
    for i in range(count):
        user = USERS[i % len(USERS)]
        send(raw, user, f"request {i}", request_id=f"{user}-{i}")
        ids.append(f"{user}-{i}")
    return ids


def _pending_of(raw, consumer: str) -> int:
    return sum(c["pending"] for c in raw.xinfo_consumers(STREAM, GROUP) if c["name"] == consumer)


@pytest.mark.slow
def test_sigkill_mid_batch_loses_nothing(raw, worker_processes) -> None:
    victim = worker_processes.start(
        "victim", concurrency="20", batch_size="20", claim_idle_ms="500", **SLOW_HANDLER
    )
    eventually(lambda: has_group(raw), "the group", timeout=15)
    expected = _send_requests(raw, 100)
    eventually(lambda: len(answered_request_ids(raw, USERS)) >= 10, "some replies", timeout=15)
    eventually(lambda: _pending_of(raw, "victim") > 0, "a batch in flight", timeout=15)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert _pending_of(raw, "victim") > 0  # the killed batch is stranded until reclaimed

    worker_processes.start("rescuer", concurrency="50", batch_size="50", claim_idle_ms="500", **SLOW_HANDLER)
    eventually(lambda: group_settled(raw), "every request answered after the kill", timeout=20)
    answered = answered_request_ids(raw, USERS)
    assert set(answered) == set(expected)  # at least once: all answered (a few may be answered twice)
    assert _pending_of(raw, "victim") == 0
    assert "reclaimed" in worker_processes.log_of("rescuer")


@pytest.mark.slow
def test_sigterm_drains_in_flight_work_and_exits_zero(raw, worker_processes) -> None:
    leaving = worker_processes.start("leaving", concurrency="30", batch_size="30", **SLOW_HANDLER)
    eventually(lambda: has_group(raw), "the group", timeout=15)
    expected = _send_requests(raw, 120)
    eventually(lambda: _pending_of(raw, "leaving") > 0, "a batch in flight", timeout=15)
    leaving.send_signal(signal.SIGTERM)
    assert leaving.wait(timeout=20) == 0
    assert _pending_of(raw, "leaving") == 0  # everything it read was answered and acknowledged
    drained = answered_request_ids(raw, USERS)
    assert len(drained) == len(set(drained))

    worker_processes.start("staying", concurrency="50", batch_size="50", **SLOW_HANDLER)
    eventually(lambda: group_settled(raw), "the rest answered", timeout=20)
    answered = answered_request_ids(raw, USERS)
    assert sorted(answered) == sorted(expected)  # nothing lost, nothing answered twice
    assert "draining" in worker_processes.log_of("leaving")


def test_help_lists_the_settings() -> None:
    out = subprocess.run([*WORKER_COMMAND, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for flag in (
        "--redis-url",
        "--stream",
        "--group",
        "--consumer",
        "--max-deliveries",
        "--shutdown-grace-seconds",
    ):
        assert flag in out.stdout


def test_invalid_settings_exit_2_with_the_reason(redis_server) -> None:
    out = subprocess.run(
        [*WORKER_COMMAND, "--batch-size", "0", "--redis-url", redis_server.url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "batch_size" in out.stderr


def test_unknown_handler_exits_2(redis_server) -> None:
    out = subprocess.run(
        [*WORKER_COMMAND, "--handler", "no.such.module:handle"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"STREAMQUEUE_REDIS_URL": redis_server.url, "STREAMQUEUE_HEALTH_PORT": "0", "PATH": ""},
    )
    assert out.returncode == 2
    assert "no.such.module" in out.stderr


@pytest.mark.parametrize("source", ["url", "env", "file"])
def test_authenticated_worker_never_logs_the_password(tmp_path, source: str) -> None:
    secret = "s3cret-value"
    with RedisServer(password=secret) as server:
        env = {"REDIS_URL": f"redis://127.0.0.1:{server.port}/0", "LOG_LEVEL": "DEBUG"}
        if source == "url":
            env["REDIS_URL"] = server.url
        elif source == "env":
            env["REDIS_PASSWORD"] = secret
        else:
            (tmp_path / "password").write_text(secret + "\n")
            env["REDIS_PASSWORD_FILE"] = str(tmp_path / "password")
        procs = WorkerProcesses(server.url, tmp_path)
        proc = procs.start("auth", **{k.lower(): v for k, v in env.items()})
        try:
            r = server.client(decode_responses=True)
            eventually(lambda: has_group(r), "the group (the worker authenticated)", timeout=15)
            send(r, "ivy", "hello", request_id="1")
            eventually(lambda: group_settled(r), "the reply", timeout=15)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        log = procs.log_of("auth")
        assert "starting on redis://" in log
        assert secret not in log
