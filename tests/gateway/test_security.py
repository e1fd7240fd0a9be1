"""Security through the gateway app, on a real redis-server and a real worker process: a user reaches
only their own requests (resume, cancel, WebSocket), and every missing, unknown, forged, expired or
misaddressed credential is refused on every route, before anything is queued, with nothing of another
user's reply in the answer."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from streamqueue import wire
from streamqueue_gateway.auth import hash_key
from streamqueue_gateway.config import GatewayConfig
from streamqueue_harness.redis_server import RedisServer
from streamqueue_harness.token_handler import tokens

from tests.gateway.conftest import KEYS, RunningGateway

SECRET = b"the-gateway-tests-hs256-secret-0123456789"
ISSUER, AUDIENCE = "https://issuer.test", "streamqueue-gateway"
TOKENS = 100  # alice's reply, 30 ms a token: still running while bob tries his luck
INTERVAL_MS = "30"


def token(**overrides: Any) -> str:
    now = int(time.time())
    claims = {"sub": "bob", "tier": "free", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 300} | overrides
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, SECRET, algorithm="HS256")


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


@pytest.fixture
def config(gateway_config: Callable[..., GatewayConfig], keys_file: Path, tmp_path: Path) -> GatewayConfig:
    """API keys (alice, bob) and HS256 JWTs, as one gateway can take both."""
    (tmp_path / "hs256").write_bytes(SECRET)
    jwt_config = {"hs256SecretFile": str(tmp_path / "hs256"), "issuer": ISSUER, "audience": AUDIENCE}
    return gateway_config(auth={"apiKeysFile": str(keys_file), "jwt": jwt_config})


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def create(http: aiohttp.ClientSession, gateway: RunningGateway, user: str, count: int) -> str:
    body = {"model": "tokens", "messages": [{"role": "user", "content": f"tokens={count}"}]}
    async with http.post(f"{gateway.url}/v1/requests", json=body, headers=bearer(KEYS[user])) as response:
        assert response.status == 202, await response.text()
        return str((await response.json())["id"])


async def read_events(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> tuple[int, str]:
    """The status and the whole body of an event stream (or of its refusal)."""
    async with http.get(url, headers=headers) as response:
        return response.status, await response.text()


@dataclass
class Running:
    """Alice's long browser request, her event stream followed from the start as her browser would
    (an unattended request is cancelled after ``resumeGraceSeconds``, as a closed tab's is)."""

    gateway: RunningGateway
    id: str
    stream: asyncio.Task[tuple[int, str]]

    async def whole(self) -> None:
        """Her stream ends with every token once, not cancelled."""
        status, body = await self.stream
        assert status == 200 and "event: done" in body and "cancelled" not in body
        assert texts(body) == "".join(tokens(TOKENS))


@pytest.fixture
async def alice(gateways: Any, workers: Any, config: GatewayConfig, http: aiohttp.ClientSession) -> Running:
    workers(tokens_interval_ms=INTERVAL_MS)
    gateway = await gateways(config)
    request_id = await create(http, gateway, "alice", TOKENS)
    url = f"{gateway.url}/v1/requests/{request_id}/events"
    return Running(gateway, request_id, asyncio.create_task(read_events(http, url, bearer(KEYS["alice"]))))


def texts(body: str) -> str:
    """The reply text of an event stream's chunk events."""
    chunks = [
        json.loads(line.removeprefix("data: ")) for line in body.splitlines() if line.startswith("data: ")
    ]
    return "".join(c for c in chunks if isinstance(c, str))


async def test_another_users_request_id_is_404_like_an_unknown_one_and_leaves_it_running(
    alice: Running, http: aiohttp.ClientSession
) -> None:
    alice_id, unknown_id = alice.id, uuid.uuid4().hex
    events = f"{alice.gateway.url}/v1/requests/{{}}/events"

    answers = {}
    for name, request_id in (("alice's", alice_id), ("unknown", unknown_id)):
        for how, url, headers in (
            ("header", events.format(request_id), bearer(KEYS["bob"])),
            ("jwt", events.format(request_id), bearer(token(sub="bob"))),
            ("query", events.format(request_id) + f"?access_token={KEYS['bob']}", {}),
            ("resume", events.format(request_id), bearer(KEYS["bob"]) | {"Last-Event-ID": "0-0"}),
        ):
            answers[name, how] = await read_events(http, url, headers)
        async with http.delete(
            f"{alice.gateway.url}/v1/requests/{request_id}", headers=bearer(KEYS["bob"])
        ) as r:
            answers[name, "cancel"] = r.status, await r.text()
    assert not alice.stream.done(), "alice's reply ended before bob's attempts: make it longer"
    for how in ("header", "jwt", "query", "resume", "cancel"):
        status, body = answers["alice's", how]
        assert status == 404, (how, body)
        assert (status, body) == answers["unknown", how], how  # not even "it exists"
        assert "t0" not in body and alice_id not in body

    for odd in ("..%2F..%2Fetc", "*", alice_id.upper(), alice_id + "0"):
        status, body = await read_events(http, events.format(odd), bearer(KEYS["alice"]))
        assert status == 404 and "t0" not in body, odd

    await alice.whole()  # bob's cancel did not reach it


async def test_a_websocket_cannot_cancel_or_see_another_users_request(
    alice: Running, http: aiohttp.ClientSession
) -> None:
    frames: list[dict[str, Any]] = []
    async with http.ws_connect(f"{alice.gateway.url}/v1/ws", headers=bearer(KEYS["bob"])) as ws:
        await ws.send_json({"type": "cancel", "id": alice.id})
        chat = {"model": "tokens", "messages": [{"role": "user", "content": "tokens=3"}]}
        await ws.send_json({"type": "chat", "ref": 1, **chat})
        async for frame in ws:
            frames.append(json.loads(frame.data))
            if frames[-1]["type"] in ("done", "error"):
                break
    assert frames[0]["type"] == "created" and frames[-1]["type"] == "done"
    assert "".join(f["text"] for f in frames if f["type"] == "chunk") == "".join(tokens(3))  # bob's own
    assert all(f["id"] != alice.id for f in frames) and alice.id not in json.dumps(frames)
    assert not alice.stream.done(), "alice's reply ended before bob's cancel: make it longer"
    await alice.whole()


# Each credential is made when its test runs (a lambda): one made at collection time can expire
# before a long suite reaches it and then be refused for that reason instead of its own.
REFUSED: dict[str, tuple[Callable[[], dict[str, str]], int]] = {
    "missing": (lambda: {}, 401),
    "not bearer": (lambda: {"Authorization": f"Basic {KEYS['alice']}"}, 401),
    "unknown key": (lambda: bearer("sk-nobody"), 401),
    "the key's hash": (lambda: bearer(hash_key(KEYS["alice"])), 401),
    "forged": (lambda: bearer(jwt.encode({"sub": "alice", "exp": 2**40}, b"x" * 40, algorithm="HS256")), 401),
    "expired": (lambda: bearer(token(exp=int(time.time()) - 3600)), 401),
    "not yet valid": (lambda: bearer(token(nbf=int(time.time()) + 3600)), 401),
    "wrong issuer": (lambda: bearer(token(iss="https://elsewhere.test")), 401),
    "wrong audience": (lambda: bearer(token(aud="another-service")), 401),
    "alg none": (lambda: bearer(jwt.encode({"sub": "alice", "exp": 2**40}, "", algorithm="none")), 401),
    "bad user id": (lambda: bearer(token(sub="alice:admin")), 403),
}


@pytest.mark.parametrize("credential", list(REFUSED), ids=list(REFUSED))
async def test_bad_credentials_are_refused_on_every_route_before_anything_is_queued(
    gateways: Any,
    config: GatewayConfig,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
    credential: str,
) -> None:
    make_headers, expected = REFUSED[credential]
    headers = make_headers()
    gateway = await gateways(config)
    chat = {"model": "tokens", "messages": [{"role": "user", "content": "tokens=1"}]}
    some_id = uuid.uuid4().hex
    for method, path, body in (
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/chat/completions", chat | {"stream": True}),
        ("POST", "/v1/requests", chat),
        ("GET", f"/v1/requests/{some_id}/events", None),
        ("DELETE", f"/v1/requests/{some_id}", None),
    ):
        async with http.request(method, gateway.url + path, json=body, headers=headers) as response:
            error = (await response.json())["error"]
            assert response.status == expected, (method, path, error)
            assert error["type"] in ("authentication_error", "permission_error"), error
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"{gateway.url}/v1/ws", headers=headers)
    assert refused.value.status == expected
    assert not redis_server.client().exists(wire.DEFAULT_STREAM)  # nothing reached the queue


async def test_a_query_token_is_taken_only_where_a_browser_needs_it(
    gateways: Any, config: GatewayConfig, http: aiohttp.ClientSession
) -> None:
    """Tokens in URLs end up in logs: the OpenAI routes take the header only."""
    gateway = await gateways(config)
    chat = {"model": "tokens", "messages": [{"role": "user", "content": "tokens=1"}]}
    url = f"{gateway.url}/v1/chat/completions?access_token={KEYS['alice']}"
    async with http.post(url, json=chat) as response:
        assert response.status == 401


async def test_a_tier_the_gateway_does_not_know_is_403(
    gateways: Any, config: GatewayConfig, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    gateway = await gateways(config)
    chat = {"model": "tokens", "messages": [{"role": "user", "content": "tokens=1"}]}
    headers = bearer(token(tier="platinum"))
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat, headers=headers) as response:
        assert response.status == 403
    async with http.post(f"{gateway.url}/v1/requests", json=chat, headers=headers) as response:
        assert response.status == 403
    assert not redis_server.client().exists(wire.DEFAULT_STREAM)
