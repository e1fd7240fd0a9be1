"""A real Redis Cluster on loopback: three primaries with a replica each (``redis-cli --cluster create``).

Partitioned queues must be tested where keys really live on different nodes (CROSSSLOT refusals,
MOVED redirections, one script per slot) and where a primary really fails: ``kill_primary`` SIGKILLs
the primary that owns a key and waits until its replica has been promoted and the cluster is whole
again. Each node is the Debian ``redis-server`` binary, no persistence, with a short node timeout so
a failover takes a few seconds rather than the default fifteen.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster

from .eventually import eventually
from .ports import free_port
from .processes import spawn, stop_groups, stopped_on_failure

NODE_TIMEOUT_MS = 1000
PRIMARIES = 3


class ClusterError(RuntimeError):
    pass


@dataclass
class _Node:
    port: int
    process: subprocess.Popen[bytes]

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)


class RedisClusterServer:
    """Six ``redis-server --cluster-enabled yes`` processes on free 127.0.0.1 ports, formed into a cluster."""

    def __init__(self, primaries: int = PRIMARIES) -> None:
        self.primaries = primaries
        self.host = "127.0.0.1"
        self._dir = Path(tempfile.mkdtemp(prefix="sq-redis-cluster-"))
        self._nodes: list[_Node] = []

    @property
    def url(self) -> str:
        """Any node's URL: cluster clients discover the others from it."""
        live = next(n for n in self._nodes if n.process.poll() is None)
        return f"redis://{self.host}:{live.port}/0"

    def client(self, **kwargs: object) -> RedisCluster:
        nodes = [ClusterNode(self.host, n.port) for n in self._nodes if n.process.poll() is None]
        return RedisCluster(startup_nodes=nodes, **kwargs)  # type: ignore[arg-type]

    def start(self, timeout: float = 60.0) -> RedisClusterServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ClusterError("redis-server not found: run `make setup` (Debian package redis-server)")
        for _ in range(self.primaries * 2):
            self._start_node(binary)
        self._create()
        self.wait_healthy(timeout)
        return self

    def _start_node(self, binary: str) -> None:
        port = free_port()
        workdir = self._dir / str(port)
        workdir.mkdir()
        options = {
            "port": str(port), "bind": self.host, "dir": str(workdir),
            "cluster-enabled": "yes", "cluster-config-file": "nodes.conf",
            # The bus defaults to port + 10000, past 65535 for half the free ports: choose it too.
            "cluster-port": str(free_port()),
            "cluster-node-timeout": str(NODE_TIMEOUT_MS),
            "save": "", "appendonly": "no", "daemonize": "no", "loglevel": "warning",
        }  # fmt: skip
        args = [binary, *(arg for name, value in options.items() for arg in (f"--{name}", value))]
        process = spawn(args, log=workdir / "redis.log")
        node = _Node(port, process)

        def answers() -> bool:
            if process.poll() is not None:
                raise ClusterError(f"redis-server on port {port} exited; see {workdir / 'redis.log'}")
            return _answers(node)

        what = f"redis-server on port {port} (see {workdir / 'redis.log'})"
        eventually(answers, what, 10, 0.02, ClusterError)
        self._nodes.append(node)

    def _create(self) -> None:
        addresses = [f"{self.host}:{n.port}" for n in self._nodes]
        result = subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            raise ClusterError(f"redis-cli --cluster create failed: {result.stdout[-500:]}{result.stderr}")

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until every live node says the cluster is ok, sees ``primaries`` live primaries, and every
        replica is linked to its primary (so it can take over)."""
        eventually(self._healthy, "a healthy cluster", timeout, error=ClusterError)

    def _healthy(self) -> bool:
        try:
            for node in self._live():
                client = node.client()
                if client.cluster("info").get("cluster_state") != "ok":
                    return False
                if _live_primaries(client) != self.primaries:
                    return False
                # A replica that never synced refuses to take over ("data age" too old): wait for links.
                replication = client.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
        except redis.RedisError:
            return False
        return True

    def _live(self) -> list[_Node]:
        return [n for n in self._nodes if n.process.poll() is None]

    def primary_for(self, key: str) -> int:
        """The port of the primary that serves ``key`` now."""
        client = self._live()[0].client()
        slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
        for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return int(primary[1])
        raise ClusterError(f"no node serves slot {slot}")

    def kill_primary(self, key: str, timeout: float = 60.0) -> int:
        """SIGKILL the primary that owns ``key``; return its port once its replica has taken over."""
        port = self.primary_for(key)
        node = next(n for n in self._nodes if n.port == port)
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()

        def taken_over() -> bool:
            return self.primary_for(key) != port and self._healthy()

        eventually(taken_over, f"a replica to take over from {port}", timeout, error=ClusterError)
        return port

    def stop(self) -> None:
        nodes, self._nodes = self._nodes, []
        stop_groups([(n.process.pid, n.process) for n in nodes], grace=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisClusterServer:
        with stopped_on_failure(self.stop):
            return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers(node: _Node) -> bool:
    try:
        return bool(node.client().ping())
    except redis.RedisError:
        return False


def _live_primaries(client: redis.Redis) -> int:
    """How many primaries this node sees up (redis-py parses CLUSTER NODES into address → fields)."""
    nodes = client.cluster("nodes").values()
    return sum(1 for n in nodes if "master" in n["flags"] and "fail" not in n["flags"])
