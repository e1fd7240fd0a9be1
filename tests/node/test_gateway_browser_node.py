"""A real browser on the real node (issue 22's "done"): headless Chromium runs the web app's script
(tests/gateway/browser_page.js) in a document of the gateway's origin, the chart's gateway Service,
creates a chat request with an API key and reads the reply with EventSource: tokens of the
llama-cpp-python server through gateway -> queue -> worker (the model handler). The text the page
assembled is the final reply the worker wrote on the user's own reply stream.

Shares the session's gateway install with test_gateway_node.py (``node_gateway``, tests/node/conftest.py).
"""

from __future__ import annotations

import pytest
from streamqueue_harness import nodequeue as q
from streamqueue_harness.browser import Chromium
from streamqueue_harness.node import Node
from streamqueue_harness.nodegateway import NodeGateway

from tests.gateway.test_browser import open_app, read_events, start_request
from tests.node.test_gateway_node import ALICE, final_replies

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


async def test_browser_chat_through_the_gateway_on_the_node(
    node_cluster: Node, node_gateway: NodeGateway
) -> None:
    key = node_gateway.keys[ALICE]
    async with Chromium() as browser:
        await open_app(browser, node_gateway.base_url.removesuffix("/v1"))
        created = await start_request(browser, key, node_gateway.model, "Count to three")
        seen = await read_events(browser, created["events"], key)
    assert seen["outcome"] == "done", seen
    text = "".join(event["data"] for event in seen["events"])
    queue = q.ensure_redis(node_cluster.plane, node_cluster.images.redis)
    try:
        assert text and final_replies(queue, ALICE)[-1] == text
    finally:
        queue.close()
