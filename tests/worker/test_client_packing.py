"""``connection.connect``'s connections pack commands with hiredis: the same bytes as redis-py's own
packer."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError
from streamqueue.connection import RedisConnection, connect

COMMANDS: list[tuple[Any, ...]] = [
    ("XREAD", "BLOCK", 2000, "STREAMS", *[f"ai_to_user:u{i}" for i in range(200)], *["0-0"] * 200),
    ("XADD", "s", "*", "message", "héllo ✓", "n", 3, "f", 0.1, "b", b"\x00\xff"),
    ("CONFIG GET", "maxmemory"),  # a command name with a space is two arguments
    (b"CLIENT SETNAME", "x"),
    ("SET", "k", 10**30),
]


def hiredis_connection() -> Any:
    redis = connect(RedisConnection(url="redis://127.0.0.1:1/0"))  # lazy: never connects
    return redis.connection_pool.make_connection()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_same_bytes_as_redis_py(command: tuple[Any, ...]) -> None:
    expected = b"".join(Connection().pack_command(*command))
    assert b"".join(hiredis_connection().pack_command(*command)) == expected


@pytest.mark.parametrize("value", [None, True])
def test_refused_values_raise_redis_py_data_error(value: object) -> None:
    with pytest.raises(DataError):
        hiredis_connection().pack_command("SET", "k", value)
