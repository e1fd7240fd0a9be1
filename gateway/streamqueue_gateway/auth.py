"""Who is calling: a bearer token (an API key or a JWT) becomes a ``Principal`` (user_id + tier).

Stub of the public interface (issue 22's contract); the implementation follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Principal:
    """The caller: ``user_id`` names its reply stream, ``tier`` selects its quotas."""

    user_id: str
    tier: str


class AuthError(Exception):
    """401: missing, forged, expired token or unknown key; 403: authenticated but not allowed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Config(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class JwtConfig(_Config):
    hs256_secret_file: Path | None = None
    jwks_file: Path | None = None
    issuer: str | None = None
    audience: str | None = None
    user_claim: str = "sub"
    tier_claim: str = "tier"
    leeway_seconds: float = 30


class AuthConfig(_Config):
    api_keys_file: Path | None = None
    jwt: JwtConfig | None = None
    default_tier: str = "free"


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self._config = config

    def authenticate(self, token: str | None) -> Principal:
        """The bearer token (Authorization header or ``access_token``) as a Principal; raises AuthError."""
        raise NotImplementedError


def hash_key(key: str) -> str:
    """The hex SHA-256 of an API key, as the keys file stores it."""
    raise NotImplementedError


def hash_key_main(argv: Sequence[str] | None = None) -> int:
    """``streamqueue-gateway hash-key``: print the hash of the key read from stdin."""
    raise NotImplementedError
