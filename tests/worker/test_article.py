"""Clients written the article's way work unchanged against the streamqueue worker.

The article's client is synchronous redis-py: a plain XADD of user_id/message/timestamp to
``user_messages_queue`` (no request_id), then it reads ``response`` from ``ai_to_user:<user_id>``,
either with plain XREAD or through a consumer group of its own. The worker runs as its own process
with nothing but the Redis URL configured, so its defaults must be the article's names.
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime

import pytest
import redis
from streamqueue_harness.eventually import eventually
from streamqueue_harness.redis_server import RedisServer
from streamqueue_harness.workerproc import spawn_worker

from tests.worker.conftest import WorkerProcesses

ARTICLE_STREAM = "user_messages_queue"
ARTICLE_GROUP = "ai_service_group"
ARTICLE_REPLY_PREFIX = "ai_to_user:"


@pytest.fixture
def worker_process(redis_server, tmp_path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m streamqueue.worker`` with no queue names configured: the article's are the defaults."""
    proc = spawn_worker(redis_server.url, "article-test", tmp_path / "article-test.log")
    r = redis_server.client(decode_responses=True)

    def started() -> bool:
        assert proc.poll() is None, f"worker exited with {proc.returncode}"
        return _has_group(r)

    eventually(started, "the worker to create the article's consumer group", timeout=30, interval=0.05)
    yield proc
    proc.terminate()
    assert proc.wait(timeout=30) == 0


def _has_group(r: redis.Redis) -> bool:
    try:
        return any(g["name"] == ARTICLE_GROUP for g in r.xinfo_groups(ARTICLE_STREAM))
    except redis.ResponseError:
        return False


class ArticleClient:
    """The article's client, as written there: no request ids, just its own reply stream."""

    def __init__(self, r: redis.Redis, user_id: str) -> None:
        self.r = r
        self.user_id = user_id
        self.last_id = "0"

    def send(self, message: str) -> None:
        self.r.xadd(
            ARTICLE_STREAM,
            {"user_id": self.user_id, "message": message, "timestamp": str(datetime.now())},
        )

    def receive(self, block_ms: int = 10_000) -> dict[str, str]:
        result = self.r.xread(
            {f"{ARTICLE_REPLY_PREFIX}{self.user_id}": self.last_id}, count=1, block=block_ms
        )
        assert result, f"no reply for {self.user_id} within {block_ms} ms"
        [(_, [(entry_id, fields)])] = result
        self.last_id = entry_id
        return fields


def test_article_client_gets_echo_replies_on_its_own_stream(redis_server, worker_process) -> None:
    r = redis_server.client(decode_responses=True)
    alice, bob = ArticleClient(r, "alice"), ArticleClient(r, "bob")
    for i in range(5):
        alice.send(f"alice says {i}")
        bob.send(f"bob says {i}")
    for client in (alice, bob):
        replies = [client.receive() for _ in range(5)]
        assert sorted(reply["response"] for reply in replies) == sorted(
            f"Echo: {client.user_id} says {i}" for i in range(5)
        )
        for reply in replies:
            assert reply["worker_id"] == "article-test"
            assert reply["timestamp"]
            assert "request_id" not in reply
    assert r.xlen(f"{ARTICLE_REPLY_PREFIX}alice") == 5
    assert r.xlen(f"{ARTICLE_REPLY_PREFIX}bob") == 5
    # The ack follows the reply in the same pipeline, so it may land just after the reply is read.
    eventually(lambda: _backlog(r) == (0, 0), "the acks", timeout=10, interval=0.02)


def _backlog(r: redis.Redis) -> tuple[int, int]:
    group = next(g for g in r.xinfo_groups(ARTICLE_STREAM) if g["name"] == ARTICLE_GROUP)
    return group["pending"], group["lag"]


class _ArticleLoop:
    """One of the article's blocking loops (a user client's reader, a worker) on its own connection
    and thread.

    Redis errors are recorded (the article's loops log them and carry on) so a test can assert there
    were none. ``stop`` wakes a blocked read with CLIENT UNBLOCK instead of waiting out its BLOCK.
    """

    def __init__(self, server: RedisServer, name: str) -> None:
        self.name = name
        # A socket timeout above BLOCK 5000: redis-py 8's default (5 s) would cut the read and reconnect.
        self.conn = server.client(decode_responses=True, single_connection_client=True, socket_timeout=15)
        self.admin = server.client(decode_responses=True)
        self.client_id = self.conn.client_id()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> _ArticleLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._read_once()
            except redis.ResponseError as exc:
                self.errors.append(str(exc))
                self._stop.wait(0.1)

    def _read_once(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop.set()

        def stopped() -> bool:
            self.admin.client_unblock(self.client_id)  # out of a blocking read that began before the set
            self._thread.join(0.05)
            return not self._thread.is_alive()

        eventually(stopped, f"{self.name} to stop", timeout=10, interval=0)
        self.conn.close()


class _ReplyReader(_ArticleLoop):
    """One of the article's user clients reading ``ai_to_user:<user_id>``; replies arrive on a queue."""

    def __init__(self, server: RedisServer, user_id: str) -> None:
        super().__init__(server, f"reader-{user_id}")
        self.key = f"{ARTICLE_REPLY_PREFIX}{user_id}"
        self.replies: queue.Queue[dict[str, str]] = queue.Queue()

    def receive(self, n: int, within: float = 20) -> list[dict[str, str]]:
        """The next ``n`` replies, waiting at most ``within`` seconds in all."""
        deadline = time.monotonic() + within
        got = []
        for _ in range(n):
            try:
                got.append(self.replies.get(timeout=max(deadline - time.monotonic(), 0)))
            except queue.Empty:
                raise AssertionError(
                    f"{self.key}: {len(got)} of {n} replies within {within}s; errors: {self.errors[-3:]}"
                ) from None
        return got


class XreadReader(_ReplyReader):
    """The article's plain reader: XREAD BLOCK from ``$``, then on from the last entry it got."""

    last_id = "$"

    def start(self) -> XreadReader:
        super().start()
        # ``$`` means "after whatever is there when the read arrives": only once the read blocks on
        # the server may a reply be written, or the reader would rightly never see it.
        eventually(lambda: _blocked(self.admin, self.client_id), f"{self.key}'s reader to block", timeout=10)
        return self

    def _read_once(self) -> None:
        for _, entries in self.conn.xread({self.key: self.last_id}, count=1, block=5000) or []:
            for entry_id, fields in entries:
                self.last_id = entry_id
                self.replies.put(fields)


class GroupReader(_ReplyReader):
    """The article's group reader: ``XGROUP CREATE <key> wsgroup_<u> 0 MKSTREAM`` once, then
    ``XREADGROUP GROUP wsgroup_<u> consumer_<u> COUNT 1 BLOCK 5000 STREAMS <key> >`` and XACK."""

    def __init__(self, server: RedisServer, user_id: str) -> None:
        super().__init__(server, user_id)
        self.group, self.consumer = f"wsgroup_{user_id}", f"consumer_{user_id}"
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: created by an earlier session
            self.conn.xgroup_create(self.key, self.group, id="0", mkstream=True)

    def _read_once(self) -> None:
        result = self.conn.xreadgroup(self.group, self.consumer, {self.key: ">"}, count=1, block=5000)
        for _, entries in result or []:
            for entry_id, fields in entries:
                self.replies.put(fields)
                self.conn.xack(self.key, self.group, entry_id)


def _blocked(admin: redis.Redis, client_id: int) -> bool:
    [info] = admin.client_list(client_id=[client_id])
    return "b" in info["flags"]


def _round(readers: list[_ReplyReader], label: str, n: int = 3) -> None:
    """Each reader's user sends ``n`` messages and must get exactly their ``n`` echoes, one user after
    the other (so the last reader's stream is the last one written to)."""
    for reader in readers:
        user = ArticleClient(reader.admin, reader.key.removeprefix(ARTICLE_REPLY_PREFIX))
        for i in range(n):
            user.send(f"{label} {i}")
        got = sorted(reply["response"] for reply in reader.receive(n))
        assert got == [f"Echo: {label} {i}" for i in range(n)]


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    assert proc.wait(timeout=30) == 0


def test_plain_and_group_readers_get_every_reply_across_expiry_and_a_worker_restart(
    redis_server: RedisServer, worker_processes: WorkerProcesses
) -> None:
    r = redis_server.client(decode_responses=True)
    worker = worker_processes.start("article-a", reply_ttl_seconds="1")
    plain, grouped = XreadReader(redis_server, "alice").start(), GroupReader(redis_server, "bob").start()
    try:
        _round([grouped, plain], "first")  # bob's last reply is written before alice's
        assert r.ttl(grouped.key) == -1
        # Idle past the TTL: alice's stream, read plainly, goes (one-time users leave no key behind)...
        eventually(lambda: not r.exists(plain.key), "alice's idle reply stream to expire", timeout=15)
        # ...bob's, read through a group, stays with its group although it has been idle even longer.
        assert r.ttl(grouped.key) == -1
        assert [g["name"] for g in r.xinfo_groups(grouped.key)] == ["wsgroup_bob"]
        _round([grouped, plain], "after idle")
        _stop_worker(worker)
        worker_processes.start("article-b", reply_ttl_seconds="1")
        _round([grouped, plain], "after restart")
        assert r.ttl(grouped.key) == -1 and r.xinfo_groups(grouped.key)[0]["pending"] == 0
    finally:
        plain.stop()
        grouped.stop()
    assert plain.errors == [] and grouped.errors == []


class ArticleWorker(_ArticleLoop):
    """The article's worker loop, in our group: ``XREADGROUP GROUP ai_service_group worker_<n> COUNT 1
    BLOCK 5000 STREAMS user_messages_queue >``, handle, XADD the reply, XACK. No reclaim, no renewal.

    A message saying "slow" stands for a long model call: the handler holds it until ``release``.
    """

    def __init__(self, server: RedisServer, name: str) -> None:
        super().__init__(server, name)
        self.holding, self.release = threading.Event(), threading.Event()
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: another worker created it
            self.conn.xgroup_create(ARTICLE_STREAM, ARTICLE_GROUP, id="0", mkstream=True)

    def _read_once(self) -> None:
        result = self.conn.xreadgroup(ARTICLE_GROUP, self.name, {ARTICLE_STREAM: ">"}, count=1, block=5000)
        for _, entries in result or []:
            for entry_id, fields in entries:
                if fields["message"] == "slow":
                    self.holding.set()
                    self.release.wait(30)
                reply = {"response": f"AI: {fields['message']}", "worker_id": self.name}
                self.conn.xadd(f"{ARTICLE_REPLY_PREFIX}{fields['user_id']}", {**reply, "timestamp": "0"})
                self.conn.xack(ARTICLE_STREAM, ARTICLE_GROUP, entry_id)

    def stop(self) -> None:
        self.release.set()
        super().stop()


def article_monitor(r: redis.Redis) -> dict[str, tuple[int, dict[str, int]]]:
    """What the article's monitor shows: per group (XINFO GROUPS) its pending count and each
    consumer's (XINFO CONSUMERS)."""
    return {
        g["name"]: (
            g["pending"],
            {c["name"]: c["pending"] for c in r.xinfo_consumers(ARTICLE_STREAM, g["name"])},
        )
        for g in r.xinfo_groups(ARTICLE_STREAM)
    }


def _responses(r: redis.Redis, user_id: str) -> list[tuple[str, str]]:
    return [(f["response"], f["worker_id"]) for _, f in r.xrange(f"{ARTICLE_REPLY_PREFIX}{user_id}")]


def _pending_scans(r: redis.Redis) -> int:
    """XAUTOCLAIM calls so far: only our workers scan the pending list."""
    return int(r.info("commandstats").get("cmdstat_xautoclaim", {}).get("calls", 0))


def test_the_articles_worker_loop_shares_the_group_with_ours(
    redis_server: RedisServer, worker_processes: WorkerProcesses
) -> None:
    r = redis_server.client(decode_responses=True)
    article = ArticleWorker(redis_server, "worker_1").start()
    try:
        ArticleClient(r, "alice").send("slow")
        assert article.holding.wait(10), "worker_1 never took alice's message"
        worker_processes.start("sq-worker-0")  # default claim idle: 30 s
        # Its pending-list scan at start-up sees worker_1's entry in flight, and must leave it there.
        eventually(lambda: _pending_scans(r) > 0, "our worker's first pending-list scan", timeout=15)
        bob = ArticleClient(r, "bob")
        for i in range(20):
            bob.send(f"b{i}")
        eventually(lambda: len(_responses(r, "bob")) == 20, "bob's replies from our worker", timeout=15)
        assert article_monitor(r) == {ARTICLE_GROUP: (1, {"worker_1": 1, "sq-worker-0": 0})}
        article.release.set()
        carol = ArticleClient(r, "carol")
        for i in range(40):
            carol.send(f"c{i}")
        eventually(
            lambda: _backlog(r) == (0, 0) and len(_responses(r, "carol")) >= 40, "every reply", timeout=15
        )
    finally:
        article.stop()
    assert _responses(r, "alice") == [("AI: slow", "worker_1")]  # answered once, by its owner
    assert sorted(_responses(r, "bob")) == sorted((f"Echo: b{i}", "sq-worker-0") for i in range(20))
    carols = [response.split(": ", 1)[1] for response, _ in _responses(r, "carol")]
    assert sorted(carols) == sorted(f"c{i}" for i in range(40))  # each exactly once, by either worker
    assert article_monitor(r) == {ARTICLE_GROUP: (0, {"worker_1": 0, "sq-worker-0": 0})}
    assert article.errors == []


def test_a_foreign_entry_held_past_claim_idle_is_answered_twice(
    redis_server: RedisServer, worker_processes: WorkerProcesses
) -> None:
    """The documented limit of a mixed fleet: the article's loop cannot renew its claim, so an entry it
    holds longer than CLAIM_IDLE_MS looks like a crashed consumer's, and ours answers it as well."""
    r = redis_server.client(decode_responses=True)
    article = ArticleWorker(redis_server, "worker_1").start()
    try:
        ArticleClient(r, "alice").send("slow")
        assert article.holding.wait(10), "worker_1 never took alice's message"
        worker_processes.start("sq-worker-0", claim_idle_ms="300")
        eventually(lambda: len(_responses(r, "alice")) == 1, "our worker to reclaim and answer", timeout=15)
        article.release.set()
        eventually(lambda: len(_responses(r, "alice")) == 2, "worker_1's own answer", timeout=15)
    finally:
        article.stop()
    assert _responses(r, "alice") == [("Echo: slow", "sq-worker-0"), ("AI: slow", "worker_1")]
    assert _backlog(r) == (0, 0)
