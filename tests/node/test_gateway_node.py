"""The gateway as issue 22's "done" asks for it, on the real node: `helm install` with `gateway.enabled`,
then the official `openai` SDK runs a non-streamed and a streamed chat through gateway -> queue ->
worker (the model handler) -> llama-cpp-python's server, authenticated by API keys whose hashes sit in a
Secret; a user of a tier whose tokens-per-minute the first reply used up gets 429 with Retry-After.

The answers are checked against the queue itself: each reply the SDK received is the final entry the
worker wrote on that user's own reply stream.
"""

from __future__ import annotations

import openai
import pytest
import redis
from streamqueue import wire
from streamqueue_harness import nodequeue as q
from streamqueue_harness.node import Node
from streamqueue_harness.nodegateway import NodeGateway

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ALICE, BOB = "alice-gw", "bob-gw"  # tiers pro (no limits) and trial (1 token a minute)


def sdk(gateway: NodeGateway, user: str) -> openai.OpenAI:
    """The SDK as a user configures it; no retries, so a 429 reaches the test."""
    return openai.OpenAI(base_url=gateway.base_url, api_key=gateway.keys[user], max_retries=0, timeout=120)


def final_replies(client: redis.Redis, user: str) -> list[str]:
    return [f[wire.RESPONSE] for f in q.replies(client, user) if wire.RESPONSE in f]


def ask(client: openai.OpenAI, model: str, text: str) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
    assert reply.choices[0].finish_reason is not None
    return reply.choices[0].message.content or ""


def test_openai_sdk_chats_through_the_gateway_under_keys_and_quotas(
    node_cluster: Node, node_gateway: NodeGateway
) -> None:
    queue = q.ensure_redis(node_cluster.plane, node_cluster.images.redis)
    alice = sdk(node_gateway, ALICE)

    assert [m.id for m in alice.models.list()] == [node_gateway.model]
    answer = ask(alice, node_gateway.model, "Say hello")
    assert answer and final_replies(queue, ALICE)[-1] == answer

    stream = alice.chat.completions.create(
        model=node_gateway.model, messages=[{"role": "user", "content": "Count to three"}], stream=True
    )
    deltas = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
    pieces = [d for d in deltas if d]
    assert len(pieces) >= 2, deltas  # token by token, not one block
    assert final_replies(queue, ALICE)[-1] == "".join(pieces)

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=node_gateway.base_url, api_key="sk-not-a-key", max_retries=0).models.list()

    bob = sdk(node_gateway, BOB)
    assert ask(bob, node_gateway.model, "Hi")  # admitted: the bucket was full; its tokens are debited
    with pytest.raises(openai.RateLimitError) as refused:
        ask(bob, node_gateway.model, "Hi again")
    assert float(refused.value.response.headers["Retry-After"]) > 0
    assert refused.value.status_code == 429
    assert len(final_replies(queue, BOB)) == 1  # the refused request never reached the queue
    queue.close()
