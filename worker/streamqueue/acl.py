"""Least-privilege Redis ACL rules for a queue's workers, the operator and ``kubectl sq``'s Redis side
(``python -m streamqueue.sqtool``), from the queue's key names.

One place says which commands each component issues and on which keys (named by ``streamqueue.wire``),
so the docs, an operator setting up Redis and the test that runs a whole flow under these users (and
drops each rule in turn, expecting ``NOPERM``) cannot drift apart. Each rule list goes after
``ACL SETUSER <name> on >password``; print them with ``python -m streamqueue.acl``.

Scripts: ``EVALSHA`` (redis-py's ``Script``, with ``SCRIPT LOAD`` after a ``NOSCRIPT``) and ``EVAL``
(the commit, leases); Redis checks every command a script calls, and its keys, against the same user.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from . import wire

# Every connection of every component: redis-py PINGs one idle longer than its health-check interval
# (``connection.HEALTH_CHECK_INTERVAL_S``), the cancel watcher's Pub/Sub connection included. AUTH and
# HELLO need no rule (Redis allows them to every user); SELECT is only sent for a database other than
# 0 (then add +select); CLIENT SETINFO (Redis >= 7.2) is refused without +client|setinfo, which
# redis-py ignores, though the ACL LOG records it.
CONNECTION_COMMANDS = ("ping",)
# What the worker loop issues on the input, dead-letter and reply streams (commit script included).
WORKER_STREAM_COMMANDS = (
    "xreadgroup", "xack", "xadd", "xclaim", "xpending", "xgroup|create",
    "xinfo|groups", "expire", "persist", "evalsha", "eval", "script|load",
    "xlen",  # counting the dead letters that deadLetterMaxLen trims
)  # fmt: skip
# Crash recovery without fairness (fairness reclaims through its own scan of the pending list).
WORKER_RECLAIM_COMMANDS = ("xautoclaim",)
# Cancel: the worker checks the cancelled set and listens on the cancel channel.
WORKER_CANCEL_COMMANDS = ("zmscore", "subscribe")
# Per-user fairness (its scripts' commands, on the fair queue's keys).
WORKER_FAIR_COMMANDS = ("xread", "xrevrange", "zadd", "zpopmin", "hset", "hget", "hdel", "hscan")
# Per-user ordering: partition leases (SET NX, scripts that renew and release) and the worker registry.
WORKER_LEASE_COMMANDS = ("set", "get", "del", "pexpire", "zadd", "zremrangebyscore", "zrange", "zrem")
# Model-API limits (the scripts of ``streamqueue.limits``), run by the HTTP and model handlers.
WORKER_LIMITS_COMMANDS = (
    "time",
    "hmget",
    "hset",
    "pexpire",
    "zadd",
    "zrem",
    "zcard",
    "zremrangebyscore",
    "set",
)
# The model handler's per-user memory.
WORKER_MEMORY_COMMANDS = ("lrange", "multi", "rpush", "ltrim", "expire", "exec")
# The operator: observation, limit-bound check, pod ranking, housekeeping (dead consumers, trimming).
OPERATOR_COMMANDS = (
    "xinfo|groups", "xinfo|consumers", "xinfo|stream", "xpending", "get", "xgroup|delconsumer", "eval",
    "xtrim",
)  # fmt: skip
# kubectl sq status (``sqtool status``): the partitions, their groups and consumers, leases, the limit
# bound, dead-letter counts.
TOOL_STATUS_COMMANDS = ("xinfo|stream", "xinfo|groups", "xinfo|consumers", "xlen", "get")
# kubectl sq dlq: list/show (XRANGE), purge (XDEL), redrive (scripts: XDEL + XADD in one slot; across
# slots a claim, SET NX PX + XRANGE, then XADD, then XDEL + DEL).
TOOL_DLQ_COMMANDS = ("xrange", "xdel", "xadd", "eval", "set", "del")
# A Redis Cluster client (redis-py's) reads the slot map and, once, the commands' key positions.
CLUSTER_CLIENT_COMMANDS = ("cluster|slots", "command")


@dataclass(frozen=True)
class QueueKeys:
    """The names a queue's Redis keys derive from (``WorkerSettings`` / the StreamQueue spec)."""

    stream: str = wire.DEFAULT_STREAM
    partitions: int = 1
    reply_prefix: str = wire.DEFAULT_REPLY_PREFIX
    dead_letter_stream: str | None = None
    ordering: bool = False  # ordering: perUser
    fairness: bool = False  # fairness: perUser
    model_calls: bool = True  # the HTTP or model handler: the limits scripts run on every call
    memory: bool = False  # the model handler with memory
    cluster: bool = False  # Redis Cluster: each component's client also learns the slot map

    def partition_streams(self) -> list[str]:
        return wire.partition_streams(self.stream, self.partitions)

    def dead_letter_streams(self) -> list[str]:
        if self.dead_letter_stream:
            return [self.dead_letter_stream]
        return [wire.dead_letter_stream(p) for p in self.partition_streams()]


@dataclass(frozen=True)
class Grant:
    """What one feature of a component needs: commands, exact keys, key prefixes, Pub/Sub channels."""

    feature: str
    commands: Sequence[str]
    keys: Sequence[str] = ()
    prefixes: Sequence[str] = ()
    channels: Sequence[str] = ()


CONNECTION = Grant("every connection (redis-py's health check)", CONNECTION_COMMANDS)


def worker_grants(q: QueueKeys) -> list[Grant]:
    """What a worker of ``q`` needs, feature by feature (the features ``q`` turns on)."""
    streams = q.partition_streams()
    loop = Grant(
        "the worker loop", WORKER_STREAM_COMMANDS, [*streams, *q.dead_letter_streams()], [q.reply_prefix]
    )
    cancel = Grant(
        "cancel", WORKER_CANCEL_COMMANDS, [wire.cancel_key(q.stream)], (), [wire.cancel_channel(q.stream)]
    )
    grants = [CONNECTION, loop, cancel]
    if not q.fairness:
        grants.append(
            Grant("crash recovery (without fairness)", WORKER_RECLAIM_COMMANDS, loop.keys[: len(streams)])
        )
    if q.fairness:
        fair = [k for s in streams for k in (wire.fair_key(s), wire.fair_clock_key(s))]
        grants.append(Grant("fairness: perUser", WORKER_FAIR_COMMANDS, fair))
    if q.ordering:
        leases = [*(wire.lease_key(s) for s in streams), wire.registry_key(q.stream)]
        grants.append(Grant("ordering: perUser", WORKER_LEASE_COMMANDS, leases))
    if q.model_calls:
        limits = [wire.limits_key(q.stream), wire.limit_calls_key(q.stream), wire.limit_bound_key(q.stream)]
        grants.append(Grant("the HTTP and model handlers (limits)", WORKER_LIMITS_COMMANDS, limits))
    if q.memory:
        memory = [wire.memory_key(q.stream, "")]
        grants.append(Grant("the model handler's memory", WORKER_MEMORY_COMMANDS, prefixes=memory))
    return [*grants, *_cluster_client(q)]


def operator_grants(q: QueueKeys) -> list[Grant]:
    """What the operator needs for ``q``: it reads the partitions, their groups and the limit-bound key,
    deletes dead consumers and trims processed entries (a script)."""
    keys = [*q.partition_streams(), wire.limit_bound_key(q.stream)]
    observation = Grant("observation, pod ranking, housekeeping", OPERATOR_COMMANDS, keys)
    return [CONNECTION, observation, *_cluster_client(q)]


def tool_grants(q: QueueKeys) -> list[Grant]:
    """What ``kubectl sq`` needs in Redis for ``q``: it runs with the worker's environment (its Redis
    user too), and a least-privilege worker user has neither XRANGE nor XDEL nor the redrive claims."""
    streams, dead = q.partition_streams(), q.dead_letter_streams()
    status = [*streams, *dead, *(wire.lease_key(s) for s in streams), wire.limit_bound_key(q.stream)]
    claims = [wire.redrive_claim_key(d, "") for d in dead]
    return [
        CONNECTION,
        Grant("kubectl sq status", TOOL_STATUS_COMMANDS, status),
        Grant("kubectl sq dlq (list, show, redrive, purge)", TOOL_DLQ_COMMANDS, [*dead, *streams], claims),
        *_cluster_client(q),
    ]


def _cluster_client(q: QueueKeys) -> list[Grant]:
    return [Grant("a Redis Cluster client", CLUSTER_CLIENT_COMMANDS)] if q.cluster else []


def rules(grants: Sequence[Grant]) -> list[str]:
    """The grants as ``ACL SETUSER`` rules, each once: ``+command``, ``~key`` (glob characters of a key
    escaped), ``~prefix*``, ``&channel``."""
    commands = [f"+{c}" for g in grants for c in g.commands]
    keys = [f"~{_escape(k)}" for g in grants for k in g.keys]
    prefixes = [f"~{_escape(p)}*" for g in grants for p in g.prefixes]
    channels = [f"&{_escape(c)}" for g in grants for c in g.channels]
    return list(dict.fromkeys([*commands, *keys, *prefixes, *channels]))


def _escape(name: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in name)


def worker_rules(q: QueueKeys) -> list[str]:
    """The ``ACL SETUSER`` rules a worker of ``q`` needs, and nothing more."""
    return rules(worker_grants(q))


def operator_rules(q: QueueKeys) -> list[str]:
    """The ``ACL SETUSER`` rules the operator needs for ``q``, and nothing more."""
    return rules(operator_grants(q))


def tool_rules(q: QueueKeys) -> list[str]:
    """The ``ACL SETUSER`` rules ``kubectl sq`` needs for ``q``, and nothing more."""
    return rules(tool_grants(q))


def docs_table(grants: Sequence[Grant]) -> list[str]:
    """A Markdown table of ``grants`` (hack/reference.py puts it in the docs)."""
    lines = ["| Needed for | Commands | Keys and channels |", "| --- | --- | --- |"]
    for g in grants:
        names = [*g.keys, *(f"{p}*" for p in g.prefixes), *(f"channel {c}" for c in g.channels)]
        commands = " ".join(f"`{c}`".replace("|", "\\|") for c in g.commands)  # a | would end the cell
        lines.append(f"| {g.feature} | {commands} | {', '.join(f'`{n}`' for n in names)} |")
    return lines


_DOCS_QUEUE = QueueKeys(ordering=True, fairness=True, memory=True)  # the default names, every feature on


def worker_docs_table() -> list[str]:
    """Every feature's row: crash recovery's from a queue without fairness, fairness's from one with it."""
    plain = worker_grants(QueueKeys(ordering=True, memory=True))
    shown = {g.feature for g in plain}
    return docs_table([*plain, *(g for g in worker_grants(_DOCS_QUEUE) if g.feature not in shown)])


def operator_docs_table() -> list[str]:
    return docs_table(operator_grants(_DOCS_QUEUE))


def tool_docs_table() -> list[str]:
    return docs_table(tool_grants(QueueKeys()))


def main(argv: Sequence[str] | None = None) -> None:
    """Print ``ACL SETUSER`` lines for a queue's workers and the operator."""
    parser = argparse.ArgumentParser(prog="python -m streamqueue.acl", description=main.__doc__)
    parser.add_argument("--stream", default=wire.DEFAULT_STREAM)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--reply-prefix", default=wire.DEFAULT_REPLY_PREFIX)
    parser.add_argument("--dead-letter-stream")
    parser.add_argument("--ordering", action="store_true", help="ordering: perUser")
    parser.add_argument("--fairness", action="store_true", help="fairness: perUser")
    parser.add_argument("--no-model-calls", action="store_true", help="a Python handler without limits")
    parser.add_argument("--memory", action="store_true", help="the model handler's memory")
    parser.add_argument("--cluster", action="store_true", help="Redis Cluster (spec.redis.cluster)")
    parser.add_argument("--worker-user", default="streamqueue-worker")
    parser.add_argument("--operator-user", default="streamqueue-operator")
    parser.add_argument("--shared-user", help="one user for both (a StreamQueue's spec.redis serves both)")
    parser.add_argument("--tool-user", help="also print a user for kubectl sq (python -m streamqueue.sqtool)")
    a = parser.parse_args(argv)
    q = QueueKeys(
        a.stream, a.partitions, a.reply_prefix, a.dead_letter_stream, a.ordering, a.fairness,
        not a.no_model_calls, a.memory, a.cluster,
    )  # fmt: skip
    users = [(a.worker_user, worker_rules(q)), (a.operator_user, operator_rules(q))]
    if a.shared_user:
        users = [(a.shared_user, rules([*worker_grants(q), *operator_grants(q)]))]
    if a.tool_user:
        users.append((a.tool_user, tool_rules(q)))
    for user, granted in users:
        words = ["ACL", "SETUSER", user, "reset", "on", ">PASSWORD", *granted]
        print(" ".join(shlex.quote(w) for w in words))


if __name__ == "__main__":
    main()
