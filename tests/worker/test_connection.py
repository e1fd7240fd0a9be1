"""connect(): ACL users, password sources, socket timeout versus BLOCK, redaction, reconnects."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from streamqueue.connection import RedisConnection, connect, redact_url, retry_transient, socket_timeout_for
from streamqueue_harness.redis_server import RedisServer


@given(socket_timeout=st.floats(min_value=0.1, max_value=120), block_ms=st.integers(1, 600_000))
def test_socket_timeout_outlasts_the_longest_block(socket_timeout: float, block_ms: int) -> None:
    s = RedisConnection(socket_timeout=socket_timeout)
    assert socket_timeout_for(s, None) == socket_timeout
    assert socket_timeout_for(s, block_ms) >= socket_timeout
    assert socket_timeout_for(s, block_ms) >= block_ms / 1000 + 1  # the server's empty reply wins


@given(
    user=st.text(alphabet="abcxyz019_", max_size=8),
    password=st.text(alphabet="abcXYZ019!~*$", min_size=1, max_size=16),
)
def test_redacted_url_never_contains_the_password(user: str, password: str) -> None:
    assume(password != "***")  # a password equal to the mask cannot be told from it
    url = f"redis://{user}:{password}@db.example:6380/2"
    redacted = redact_url(url)
    assert f":{password}@" not in redacted
    assert redacted == f"redis://{user}:***@db.example:6380/2"


def test_url_without_password_is_unchanged() -> None:
    assert redact_url("rediss://db:6379/0") == "rediss://db:6379/0"


async def test_acl_user_with_password_file(redis_server, tmp_path) -> None:
    admin = redis_server.client()
    admin.acl_setuser("worker", enabled=True, passwords=["+w-pass"], keys=["*"], commands=["+@all"])
    (tmp_path / "pw").write_text("w-pass\n")
    r = connect(RedisConnection(url=redis_server.url, username="worker", password_file=tmp_path / "pw"))
    try:
        assert await r.acl_whoami() == "worker"
    finally:
        await r.aclose()


async def test_wrong_password_fails_with_an_auth_error(redis_server) -> None:
    redis_server.client().acl_setuser("worker", enabled=True, passwords=["+right"], commands=["+@all"])
    r = connect(RedisConnection(url=redis_server.url, username="worker", password="no"))
    try:
        with pytest.raises((AuthenticationError, ResponseError)):
            await r.ping()
    finally:
        await r.aclose()


def test_unreadable_password_file_names_the_file(tmp_path) -> None:
    s = RedisConnection(password_file=tmp_path / "missing")
    with pytest.raises(ValueError, match="missing"):
        connect(s)


@pytest.mark.slow
async def test_a_block_longer_than_the_default_socket_timeout_is_not_cut(redis_server) -> None:
    r = connect(RedisConnection(url=redis_server.url, socket_timeout=1), block_ms=2500)
    try:
        started = time.monotonic()
        assert await r.xread({"empty": "$"}, block=2500) == []
        assert time.monotonic() - started >= 2.4
    finally:
        await r.aclose()


async def test_commands_retry_through_a_short_outage(tmp_path) -> None:
    server = RedisServer().start()
    try:
        r = connect(RedisConnection(url=server.url))
        await r.set("k", "1")
        server.stop()
        server.start()
        assert await r.set("k", "2")  # the pooled connection died; the retry reconnects
        await r.aclose()
    finally:
        server.close()


async def test_a_rotated_password_file_is_used_by_new_connections(redis_server, tmp_path) -> None:
    admin = redis_server.client()
    admin.acl_setuser("worker", enabled=True, passwords=["+old"], keys=["*"], commands=["+@all"])
    secret = tmp_path / "pw"
    secret.write_text("old\n")
    r = connect(RedisConnection(url=redis_server.url, username="worker", password_file=secret))
    try:
        assert await r.acl_whoami() == "worker"
        admin.acl_setuser("worker", enabled=True, reset_passwords=True, passwords=["+new"])  # rotate...
        secret.write_text("new\n")  # ...the Secret
        admin.client_kill_filter(user="worker")  # ...and drop the connection that authenticated before
        assert await r.acl_whoami() == "worker"  # reconnected with the new password, no restart
    finally:
        await r.aclose()


class _Flaky:
    """Fails with each of ``errors`` in turn, then returns ``"done"``."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


async def test_retry_transient_waits_out_connection_errors_with_the_backoff_delays() -> None:
    operation = _Flaky(RedisConnectionError("down"), RedisTimeoutError("slow"), RedisConnectionError("down"))
    seen: list[tuple[str, float]] = []
    curve = ExponentialBackoff(cap=0.004, base=0.001)
    result = await retry_transient(operation, lambda exc, d: seen.append((str(exc), d)), backoff=curve)
    assert result == "done" and operation.calls == 4
    assert seen == [("down", 0.001), ("slow", 0.002), ("down", 0.004)]  # the curve from the first failure


async def test_retry_transient_passes_other_errors_through_at_once() -> None:
    operation = _Flaky(ResponseError("WRONGTYPE"))
    with pytest.raises(ResponseError):
        await retry_transient(operation, lambda exc, delay: pytest.fail("no retry expected"))
    assert operation.calls == 1


async def test_retry_transient_ends_with_none_when_stopped_while_waiting() -> None:
    stop = asyncio.Event()
    operation = _Flaky(*[RedisConnectionError("down")] * 100)
    started = time.monotonic()
    result = await retry_transient(
        operation, lambda exc, delay: stop.set(), stop=stop, backoff=ExponentialBackoff(cap=60, base=60)
    )
    assert result is None and operation.calls == 1
    assert time.monotonic() - started < 30  # the stop cut the 60 s wait short
    assert await retry_transient(operation, lambda exc, delay: None, stop=stop) is None  # no try once stopped
    assert operation.calls == 1
