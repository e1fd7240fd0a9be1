"""The model handler's API key reaches the worker only as a secretKeyRef, never as a value in the CR."""

from __future__ import annotations

from streamqueue.settings import TUNING_FIELDS
from streamqueue_operator.deployment import render
from streamqueue_operator.models import parse_spec

OWNER = {"metadata": {"name": "chat", "namespace": "team", "uid": "1234"}}


def _env(spec: dict) -> dict[str, dict]:
    [container] = render(OWNER, parse_spec(spec), "img")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def test_api_key_is_rendered_as_a_secret_key_ref() -> None:
    env = _env(
        {
            "worker": {
                "handler": "streamqueue.handlers.openai:handle",
                "openaiBaseUrl": "http://vllm:8000/v1",
                "openaiModel": "llama",
                "openaiMemoryTurns": 4,
                "openaiApiKeySecretRef": {"name": "model-api"},
            }
        }
    )
    assert env["STREAMQUEUE_OPENAI_API_KEY"] == {
        "name": "STREAMQUEUE_OPENAI_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "model-api", "key": "api-key"}},
    }
    assert env["STREAMQUEUE_OPENAI_BASE_URL"]["value"] == "http://vllm:8000/v1"
    assert env["STREAMQUEUE_OPENAI_MEMORY_TURNS"]["value"] == "4"


def test_the_key_itself_is_no_spec_field() -> None:
    """A key written into the CR is no field: the API server prunes it, and nothing renders it."""
    assert "openai_api_key" not in TUNING_FIELDS
    assert "STREAMQUEUE_OPENAI_API_KEY" not in _env({"worker": {"openaiApiKey": "sk-plain"}})
