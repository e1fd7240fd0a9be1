"""Observe a queue: XINFO GROUPS + XINFO STREAM of every partition, pipelined in one round trip.

A partitioned queue is summed into one ``Observation`` (its backlog is the sum; each partition's is
kept for status and metrics). On a Redis Cluster redis-py sends the pipeline as one batch per node,
so a poll costs one round trip per node however many partitions there are.

The result is a plain value (``Observation``) so the decision can stay a pure function. Turning the
replies into it (a nil lag estimated from above, partitions combined) is ``streamqueue.observation``,
which the monitor shares. ``consumer_loads`` reads every partition's consumers for the pod ranking.

The same pipeline reads the queue's limit-bound key (``wire.limit_bound_key``): the workers keep it
while their model-API calls wait for a shared limit, so more pods would not help. It only adds to an
observation: an error reading it (an ACL without GET on it, a wrong type) counts as not bound, and a
Redis outage is already reported by the XINFO replies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import redis
import redis.asyncio
from streamqueue import wire
from streamqueue.connection import group_missing
from streamqueue.observation import Observation, add_reads, from_pipeline, no_such_key

from .deletion_cost import ConsumerLoad, combine_loads, loads_from_reply
from .redis_hub import Commands, Run

# The reason recorded for a limit-bound key whose value is none of wire.LIMIT_REASONS (a newer worker):
# the key's presence is what means "bound".
UNKNOWN_LIMIT = "UnknownLimit"


def limit_reason(reply: Any) -> str | None:
    """The limit-bound key's GET reply as a reason: None when absent or unreadable (see the module doc)."""
    if reply is None or isinstance(reply, Exception):
        return None
    value = reply.decode() if isinstance(reply, bytes) else str(reply)
    return value if value in wire.LIMIT_REASONS else UNKNOWN_LIMIT


async def observe(
    client: Any, streams: Sequence[str], group: str, at: float, limit_key: str | None = None
) -> Observation:
    """Read every partition, and ``limit_key`` when given, in one pipeline of the queue's own."""

    async def run(commands: Commands) -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            commands(pipe)
            return list(await pipe.execute(raise_on_error=False))

    return await observe_with(run, streams, group, at, limit_key)


async def observe_with(
    run: Run,
    streams: Sequence[str],
    group: str,
    at: float,
    limit_key: str | None = None,
) -> Observation:
    """``observe`` through ``run``, which sends the commands (``redis_hub.SharedPipeline.execute``
    batches them with other queues'); connection failures become an error Observation."""

    def commands(pipe: Any) -> None:
        add_reads(pipe, streams)
        if limit_key is not None:
            pipe.get(limit_key)

    try:
        replies = await run(commands)
    except (redis.RedisError, OSError) as exc:
        return Observation(at=at, error=f"{type(exc).__name__}: {exc}")
    obs = from_pipeline(at, group, streams, replies)
    if limit_key is None or obs.error is not None:
        return obs
    return replace(obs, limit_bound=limit_reason(replies[-1]))


async def consumer_loads(client: Any, streams: Sequence[str], group: str) -> dict[str, ConsumerLoad]:
    """Each consumer's load over every partition: ``XINFO CONSUMERS`` of each in one pipeline (one
    round trip per node on a cluster), combined per consumer (pod). A partition without the group or
    stream yet has no consumers; any other error is raised, as is a connection failure."""
    async with client.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_consumers(stream, group)
        replies = await pipe.execute(raise_on_error=False)
    loads = []
    for reply in replies:
        if group_missing(reply) or no_such_key(reply):
            continue
        if isinstance(reply, Exception):
            raise reply
        loads.append(loads_from_reply(reply))
    return combine_loads(loads)
