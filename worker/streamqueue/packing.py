"""Commands packed by hiredis (C) instead of redis-py's asyncio packer (Python), for every connection
``streamqueue.connection.connect`` makes to one server (the client's, the gateway's, the worker's).

redis-py's asyncio connections pack each command in Python, argument by argument, growing one buffer
by concatenation. The reply reader's XREAD names every user's stream and cursor (400 arguments for 200
users waiting), and packing it took about 1 ms of the event loop per read: the largest share of a
gateway's CPU at 200 streams (py-spy), and of any reader's. hiredis packs the same bytes about 20 times
faster. The worker's commit script names every reply stream of a flush as a key. redis-py's sync
client packs with hiredis already; its asyncio client does not yet (redis/redis-py#4176).
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection


class _HiredisPacking(AbstractConnection):
    """``pack_command`` by hiredis; what hiredis refuses (None, a bool) goes to redis-py's packer,
    which raises its usual ``DataError``."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):  # a command name with a space ("CONFIG GET") is two arguments
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)


_CLASSES: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _hiredis_packing(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """``base`` (a TCP, TLS or Unix socket connection) packing with hiredis; one class per base."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"HiredisPacking{base.__name__}", (_HiredisPacking, base), {})
    return _CLASSES[base]


def pack_with_hiredis(redis: aioredis.Redis) -> None:
    """Have ``redis``'s connections, made from now on, pack commands with hiredis. One server's pool
    only (a cluster client's per-node pools keep redis-py's packer); UTF-8 text only, hiredis's
    encoding (the connection's default, as ``streamqueue.connection`` makes them)."""
    pool = redis.connection_pool
    if pool.connection_kwargs.get("encoding", "utf-8") != "utf-8":
        return
    pool.connection_class = _hiredis_packing(pool.connection_class)
