"""The partition proxy in front of a real redis-server: forwards, hangs everything while cut, and
after healing forwards only connections opened since."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from streamqueue_harness.partition import PartitionProxy
from streamqueue_harness.redis_server import RedisServer

PING = b"*1\r\n$4\r\nPING\r\n"


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[PartitionProxy]:
    with PartitionProxy(redis_server.host, redis_server.port) as p:
        yield p


def _client(proxy: PartitionProxy) -> redis.Redis:
    timeouts = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
    return redis.Redis(host="127.0.0.1", port=proxy.port, retry=Retry(NoBackoff(), 0), **timeouts)


def _raw_ping(sock: socket.socket) -> bytes:
    sock.sendall(PING)
    return sock.recv(100)


def test_forwards_until_cut_then_hangs_old_and_new_connections(proxy: PartitionProxy) -> None:
    before = _client(proxy)
    assert before.ping()
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5)
    assert _raw_ping(raw) == b"+PONG\r\n"

    proxy.partition()
    with pytest.raises(redis.TimeoutError):
        before.ping()
    with pytest.raises(redis.TimeoutError):
        _client(proxy).ping()  # accepted, never answered: not refused
    with pytest.raises(TimeoutError):
        _raw_ping(raw)

    proxy.heal()
    assert _client(proxy).ping()
    with pytest.raises(TimeoutError):
        _raw_ping(raw)  # a connection that lived through the partition stays cut, with no FIN or RST
    raw.close()
