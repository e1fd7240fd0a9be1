"""A client written the article's way works unchanged against the streamqueue worker.

The article's client is synchronous redis-py: a plain XADD of user_id/message/timestamp to
``user_messages_queue`` (no request_id), then XREAD on ``ai_to_user:<user_id>`` reading ``response``.
The worker runs as its own process with nothing but the Redis URL configured, so its defaults must be
the article's names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime

import pytest
import redis

ARTICLE_STREAM = "user_messages_queue"
ARTICLE_GROUP = "ai_service_group"
ARTICLE_REPLY_PREFIX = "ai_to_user:"


@pytest.fixture
def worker_process(redis_server) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m streamqueue.worker`` with no queue names configured: the article's are the defaults."""
    env = {
        **os.environ,
        "STREAMQUEUE_REDIS_URL": redis_server.url,
        "STREAMQUEUE_CONSUMER": "article-test",
        "STREAMQUEUE_HEALTH_PORT": "0",
    }
    proc = subprocess.Popen([sys.executable, "-m", "streamqueue.worker"], env=env)
    r = redis_server.client(decode_responses=True)
    deadline = time.monotonic() + 30
    while not _has_group(r):
        assert proc.poll() is None, f"worker exited with {proc.returncode}"
        assert time.monotonic() < deadline, "worker did not create the article's consumer group in 30 s"
        time.sleep(0.05)
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
    deadline = time.monotonic() + 10
    while _backlog(r) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _backlog(r) == (0, 0)


def _backlog(r: redis.Redis) -> tuple[int, int]:
    group = next(g for g in r.xinfo_groups(ARTICLE_STREAM) if g["name"] == ARTICLE_GROUP)
    return group["pending"], group["lag"]
