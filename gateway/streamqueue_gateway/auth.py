"""Who is calling: a bearer token (an API key or a JWT) becomes a ``Principal`` (user_id + tier).

A token with three dot-separated parts is a JWT, anything else an API key. The credentials live in
files mounted from Kubernetes Secrets and are re-read when they change (a Secret update swaps the
mounted file), so keys and signing keys rotate without a restart; a file that becomes unreadable
fails every request it serves with 503 rather than keep serving revoked credentials.

- API keys: only their SHA-256 hashes are stored (``hash-key`` prints one); the presented key's hash is
  looked up in a dict of the stored hashes, one lookup whatever the number of keys. That lookup's
  timing is no oracle: a near miss is near in the hash, not in the key, and SHA-256 cannot be steered
  from the key's side, so learning how many leading bytes of a hash matched brings an attacker no
  closer to a key (the reason to compare secrets in constant time is a comparison of the secret itself).
- JWT: HS256 with a shared secret file, RS256 with a JWKS file (the header's ``kid`` selects the key).
  The header's ``alg`` only picks which of the configured keys to try, and that key is verified for its
  own algorithm alone, so an HS256 token "signed" with the RSA public key, or ``alg: none``, fails.
  ``exp`` is required; ``nbf``, issuer and audience are checked, with ``leeway_seconds`` of clock skew.

Status: 401 for a missing, malformed, forged, expired or unknown credential (the client should
authenticate again); 403 for a valid one whose user_id the queue cannot use (``wire.user_id_rejection``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import jwt
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from streamqueue import wire

from .filemodel import FileModel

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Principal:
    """The caller: ``user_id`` names its reply stream, ``tier`` selects its quotas."""

    user_id: str
    tier: str


class AuthError(Exception):
    """401: missing, forged, expired token or unknown key; 403: authenticated but not allowed;
    503: a credentials file cannot be read (fail closed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class JwtConfig(FileModel):
    hs256_secret_file: Path | None = None
    jwks_file: Path | None = None
    issuer: str | None = None
    audience: str | None = None
    user_claim: str = "sub"
    tier_claim: str = "tier"
    leeway_seconds: float = Field(default=30, ge=0)


class AuthConfig(FileModel):
    api_keys_file: Path | None = None
    jwt: JwtConfig | None = None
    default_tier: str = "free"


class ApiKey(BaseModel):
    """One entry of the API keys file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    user: str
    tier: str | None = None


_API_KEYS = TypeAdapter(list[ApiKey])


class _WatchedFile(Generic[T]):
    """A file parsed once per version: re-read when its inode, size or mtime changes (one ``stat`` per
    use, about a microsecond), which catches a Secret's atomic symlink swap as well as an edit."""

    def __init__(self, path: Path, parse: Callable[[bytes], T]) -> None:
        self._path = path
        self._parse = parse
        self._version: tuple[int, int, int] | None = None
        self._value: T | None = None
        self.get()  # a bad file at start-up stops the gateway there, not at its first request

    def get(self) -> T:
        try:
            st = os.stat(self._path)
            version = (st.st_ino, st.st_size, st.st_mtime_ns)
            if version != self._version or self._value is None:
                self._value = self._parse(self._path.read_bytes())
                self._version = version
                log.info("loaded %s", self._path)
        except (OSError, ValueError) as exc:
            self._version, self._value = None, None
            log.error("cannot read %s: %s", self._path, exc)
            raise AuthError(503, "credentials unavailable") from exc
        return self._value


def hash_key(key: str) -> str:
    """The hex SHA-256 of an API key, as the keys file stores it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _parse_keys(data: bytes) -> dict[str, ApiKey]:
    """The entries by their hash; a hash listed twice is refused (which user would it be?)."""
    try:
        keys = _API_KEYS.validate_json(data)
    except ValidationError as exc:
        raise ValueError(str(exc)) from exc
    by_hash = {k.sha256: k for k in keys}
    if len(by_hash) != len(keys):
        raise ValueError("the same key hash is listed more than once")
    return by_hash


def _parse_secret(data: bytes) -> bytes:
    """The HS256 secret; a trailing newline (``echo secret > file``) is not part of it."""
    secret = data.rstrip(b"\r\n")
    if not secret:
        raise ValueError("the HS256 secret file is empty")
    return secret


def _parse_jwks(data: bytes) -> dict[str, jwt.PyJWK]:
    """RS256 keys by kid; keys of another type or algorithm are left out, never tried."""
    try:
        keys = jwt.PyJWKSet.from_json(data.decode("utf-8")).keys
    except (jwt.PyJWKSetError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from exc
    usable = {
        key.key_id or "": key
        for key in keys
        if key.key_type == "RSA" and key.algorithm_name == "RS256" and key.public_key_use in (None, "sig")
    }
    if not usable:
        raise ValueError("the JWKS file has no RSA signing key usable with RS256")
    return usable


class Authenticator:
    """Turns a bearer token into a Principal against the configured API keys and JWT keys."""

    def __init__(self, config: AuthConfig) -> None:
        self._config = config
        jwt_config = config.jwt
        self._jwt = jwt_config
        self._keys = _WatchedFile(config.api_keys_file, _parse_keys) if config.api_keys_file else None
        self._secret = (
            _WatchedFile(jwt_config.hs256_secret_file, _parse_secret)
            if jwt_config and jwt_config.hs256_secret_file
            else None
        )
        self._jwks = (
            _WatchedFile(jwt_config.jwks_file, _parse_jwks) if jwt_config and jwt_config.jwks_file else None
        )
        if self._keys is None and self._secret is None and self._jwks is None:
            raise ValueError("auth needs apiKeysFile, jwt.hs256SecretFile or jwt.jwksFile")

    def authenticate(self, token: str | None) -> Principal:
        """The bearer token (Authorization header or ``access_token``) as a Principal; raises AuthError."""
        if not token:
            raise AuthError(401, "missing bearer token")
        if token.count(".") == 2:
            user_id, tier = self._from_jwt(token)
        else:
            user_id, tier = self._from_api_key(token)
        rejection = wire.user_id_rejection(user_id)
        if rejection is not None:
            raise AuthError(403, f"this identity cannot use the queue: {rejection.detail}")
        return Principal(user_id, tier or self._config.default_tier)

    def _from_api_key(self, token: str) -> tuple[str, str | None]:
        """The key's entry, found by its hash (see the module's docstring for why that leaks nothing)."""
        if self._keys is None:
            raise AuthError(401, "invalid credentials")
        found = self._keys.get().get(hash_key(token))
        if found is None:
            raise AuthError(401, "invalid credentials")
        return found.user, found.tier

    def _from_jwt(self, token: str) -> tuple[str, str | None]:
        config = self._jwt
        if config is None:
            raise AuthError(401, "invalid credentials")
        try:
            header = jwt.get_unverified_header(token)
            key, algorithm = self._verification_key(header)
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=config.issuer,
                audience=config.audience,
                leeway=config.leeway_seconds,
                options={"require": ["exp"]},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(401, f"invalid token: {exc}") from exc
        user_id, tier = claims.get(config.user_claim), claims.get(config.tier_claim)
        if not isinstance(user_id, str):
            raise AuthError(403, f"the token has no string claim {config.user_claim!r}")
        if tier is not None and not isinstance(tier, str):
            raise AuthError(403, f"the token's claim {config.tier_claim!r} is not a string")
        return user_id, tier

    def _verification_key(self, header: dict[str, Any]) -> tuple[Any, str]:
        """The configured key the header asks for, and the one algorithm it may verify."""
        alg = header.get("alg")
        if alg == "HS256" and self._secret is not None:
            return self._secret.get(), "HS256"
        if alg == "RS256" and self._jwks is not None:
            keys = self._jwks.get()
            kid = header.get("kid")
            if kid is None and len(keys) == 1:
                return next(iter(keys.values())), "RS256"
            if isinstance(kid, str) and kid in keys:
                return keys[kid], "RS256"
            raise jwt.InvalidKeyError("no key in the JWKS file has the token's kid")
        raise jwt.InvalidAlgorithmError(f"algorithm {alg!r} is not accepted")


def hash_key_main(argv: Sequence[str] | None = None) -> int:
    """``streamqueue-gateway hash-key``: print the hash of the key read from stdin (one line), or with
    ``--user`` a whole entry for the keys file, so the key itself never has to be stored anywhere."""
    parser = argparse.ArgumentParser(
        prog="streamqueue-gateway hash-key",
        description="Read an API key from stdin and print its SHA-256 for the gateway's API keys file.",
    )
    parser.add_argument("--user", help="print a keys-file entry for this user_id instead of the bare hash")
    parser.add_argument("--tier", help="the entry's tier (default: the gateway's defaultTier)")
    args = parser.parse_args(argv)
    key = sys.stdin.readline().rstrip("\r\n")
    if not key:
        parser.error("no key on stdin")
    digest = hash_key(key)
    if args.user is None:
        print(digest)
        return 0
    rejection = wire.user_id_rejection(args.user)
    if rejection is not None:
        parser.error(rejection.detail)
    entry = {"sha256": digest, "user": args.user} | ({"tier": args.tier} if args.tier else {})
    print(json.dumps(entry))
    return 0


if __name__ == "__main__":
    raise SystemExit(hash_key_main())
