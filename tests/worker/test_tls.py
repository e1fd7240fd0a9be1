"""TLS to Redis: a real redis-server with a TLS port and a CA made by the harness's openssl helpers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from streamqueue import wire
from streamqueue.connection import RedisConnection, connect
from streamqueue.settings import WorkerSettings
from streamqueue_harness.eventually import eventually, eventually_async
from streamqueue_harness.pki import certificate_authority, signed_certificate
from streamqueue_harness.ports import free_port
from streamqueue_harness.processes import spawn, stop_groups

from tests.worker.conftest import RunningWorkers, group_settled, replies, send


class TlsRedis:
    def __init__(self, port: int, ca: Path) -> None:
        self.port = port
        self.ca = ca

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=str(self.ca), decode_responses=True
        )


@pytest.fixture
def tls_redis(tmp_path) -> Iterator[TlsRedis]:
    ca = certificate_authority(tmp_path, "streamqueue-test-ca")
    server = signed_certificate(
        tmp_path, ca, "redis", "/CN=redis", "serverAuth", ("IP:127.0.0.1", "DNS:localhost")
    )
    port = free_port()
    args = [
        shutil.which("redis-server") or "redis-server", "--port", "0", "--tls-port", str(port),
        "--bind", "127.0.0.1", "--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key),
        "--tls-ca-cert-file", str(ca.cert), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
        "--dir", str(tmp_path),
    ]  # fmt: skip
    proc = spawn(args, log=tmp_path / "redis.log")
    tls = TlsRedis(port, ca.cert)
    try:

        def answers() -> bool:
            assert proc.poll() is None, (tmp_path / "redis.log").read_text()
            try:
                return bool(tls.client().ping())
            except redis.RedisError:
                return False

        eventually(answers, "the TLS redis-server", timeout=10, interval=0.05)
        yield tls
    finally:
        stop_groups([(proc.pid, proc)], grace=10)


@pytest.mark.parametrize("how", ["rediss-url", "tls-flag"])
async def test_worker_answers_over_tls(tls_redis: TlsRedis, how: str) -> None:
    url = f"redis://127.0.0.1:{tls_redis.port}/0"
    settings = WorkerSettings(
        redis_url=url.replace("redis://", "rediss://") if how == "rediss-url" else url,
        redis_tls=how == "tls-flag",
        redis_tls_ca_file=tls_redis.ca,
        consumer="tls",
        block_ms=100,
        health_port=0,
    )
    raw = tls_redis.client()
    workers = RunningWorkers(raw)
    await workers.start(settings)
    try:
        send(raw, "nina", "secure hello", request_id="n1")
        await eventually_async(lambda: group_settled(raw), "the reply over TLS", timeout=15)
        [reply] = replies(raw, "nina")
        assert reply[wire.RESPONSE] == "Echo: secure hello"
    finally:
        for worker, _ in workers.running:
            await workers.stop(worker)


async def test_an_untrusted_server_certificate_is_refused(tls_redis: TlsRedis, tmp_path) -> None:
    (tmp_path / "other").mkdir()
    other_ca = certificate_authority(tmp_path / "other", "someone-else")
    r = connect(RedisConnection(url=f"rediss://127.0.0.1:{tls_redis.port}/0", tls_ca_file=other_ca.cert))
    try:
        with pytest.raises(RedisConnectionError, match=r"(?i)certificate verify failed"):
            await r.ping()
    finally:
        await r.aclose()


async def test_a_ca_given_as_data_verifies_the_server(tls_redis: TlsRedis) -> None:
    """The operator passes the CA bundle it read from a Secret as data: no file is written."""
    r = connect(
        RedisConnection(url=f"rediss://127.0.0.1:{tls_redis.port}/0", tls_ca_data=tls_redis.ca.read_text())
    )
    try:
        assert await r.ping()
    finally:
        await r.aclose()
