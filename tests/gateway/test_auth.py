"""The gateway's authentication: API keys from a hashed keys file, JWT HS256 and RS256 (JWKS), and the
refusals that matter (forged, expired, wrong issuer or audience, alg none, alg confusion)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from pydantic import ValidationError
from streamqueue_gateway.auth import (
    AuthConfig,
    Authenticator,
    AuthError,
    JwtConfig,
    Principal,
    hash_key,
    hash_key_main,
)

SECRET = b"a-shared-secret-long-enough-for-hs256-and-for-the-hs512-case-too"
ISSUER, AUDIENCE = "https://issuer.example", "streamqueue-gateway"


def write_keys(path: Path, entries: list[dict[str, str]]) -> Path:
    path.write_text(json.dumps(entries))
    return path


def status_of(auth: Authenticator, token: str | None) -> int:
    with pytest.raises(AuthError) as caught:
        auth.authenticate(token)
    return caught.value.status


@pytest.fixture
def keys_auth(tmp_path: Path) -> Authenticator:
    keys = write_keys(
        tmp_path / "keys.json",
        [
            {"sha256": hash_key("alice-key"), "user": "alice", "tier": "pro"},
            {"sha256": hash_key("bob-key"), "user": "bob"},
            {"sha256": hash_key("colon-key"), "user": "not:allowed"},
        ],
    )
    return Authenticator(AuthConfig(api_keys_file=keys, default_tier="free"))


def test_an_api_key_names_its_user_and_tier_and_the_default_tier_fills_in(keys_auth: Authenticator) -> None:
    assert keys_auth.authenticate("alice-key") == Principal("alice", "pro")
    assert keys_auth.authenticate("bob-key") == Principal("bob", "free")


@pytest.mark.parametrize("token", [None, "", "alice-key2", "ALICE-KEY", hash_key("alice-key")])
def test_a_missing_or_unknown_key_is_401(keys_auth: Authenticator, token: str | None) -> None:
    """The stored hash itself is not a key: only its preimage is."""
    assert status_of(keys_auth, token) == 401


def test_a_user_id_the_queue_cannot_use_is_403(keys_auth: Authenticator) -> None:
    assert status_of(keys_auth, "colon-key") == 403


def test_a_rewritten_keys_file_is_read_again(tmp_path: Path, keys_auth: Authenticator) -> None:
    """An edit in place (same inode) with another size is seen at the next request."""
    write_keys(tmp_path / "keys.json", [{"sha256": hash_key("carol-key-new"), "user": "carol"}])
    assert keys_auth.authenticate("carol-key-new") == Principal("carol", "free")
    assert status_of(keys_auth, "alice-key") == 401


def test_a_secret_update_swapping_the_mount_symlink_rotates_the_keys(tmp_path: Path) -> None:
    """Kubernetes updates a mounted Secret by pointing ``..data`` at a new directory, atomically."""
    for version, key in (("..v1", "old-key"), ("..v2", "new-key")):
        (tmp_path / version).mkdir()
        write_keys(tmp_path / version / "keys.json", [{"sha256": hash_key(key), "user": "dave"}])
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "keys.json").symlink_to("..data/keys.json")
    auth = Authenticator(AuthConfig(api_keys_file=tmp_path / "keys.json"))
    assert auth.authenticate("old-key").user_id == "dave"

    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")

    assert auth.authenticate("new-key").user_id == "dave"
    assert status_of(auth, "old-key") == 401


def _auth_seconds(auth: Authenticator, token: str, calls: int = 200) -> float:
    """The best of five timings of ``calls`` authentications (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            auth.authenticate(token)
        best = min(best, time.perf_counter() - started)
    return best


def test_an_api_key_check_costs_the_same_with_one_key_or_twenty_thousand(tmp_path: Path) -> None:
    """A lookup by hash, not a comparison with every stored hash (175 us a request at 200 keys)."""
    one = write_keys(tmp_path / "one.json", [{"sha256": hash_key("k"), "user": "erin"}])
    many = [{"sha256": hash_key(f"other-{i}"), "user": f"u{i}"} for i in range(20_000)]
    many_file = write_keys(tmp_path / "many.json", [*many, {"sha256": hash_key("k"), "user": "erin"}])
    few = Authenticator(AuthConfig(api_keys_file=one))
    lots = Authenticator(AuthConfig(api_keys_file=many_file))
    assert lots.authenticate("k").user_id == "erin"
    assert _auth_seconds(lots, "k") < 5 * _auth_seconds(few, "k")


def test_a_hash_listed_twice_is_refused(tmp_path: Path) -> None:
    entries = [{"sha256": hash_key("k"), "user": "erin"}, {"sha256": hash_key("k"), "user": "mallory"}]
    with pytest.raises(AuthError):
        Authenticator(AuthConfig(api_keys_file=write_keys(tmp_path / "keys.json", entries)))


def test_a_broken_keys_file_stops_start_up_and_later_fails_closed(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"sha256": "not-hex", "user": "x"}]')
    with pytest.raises(AuthError):
        Authenticator(AuthConfig(api_keys_file=bad))

    good = write_keys(tmp_path / "keys.json", [{"sha256": hash_key("k"), "user": "erin"}])
    auth = Authenticator(AuthConfig(api_keys_file=good))
    good.write_text("{ truncated")
    assert status_of(auth, "k") == 503  # not the old keys: a revoked key must not live on
    good.unlink()
    assert status_of(auth, "k") == 503


def test_the_config_reads_camel_case_and_refuses_unknown_fields(tmp_path: Path) -> None:
    config = AuthConfig.model_validate(
        {
            "apiKeysFile": "/k.json",
            "jwt": {"hs256SecretFile": "/s", "jwksFile": "/j.json", "userClaim": "email", "leewaySeconds": 5},
            "defaultTier": "basic",
        }
    )
    assert config.jwt is not None and config.jwt.leeway_seconds == 5 and config.jwt.user_claim == "email"
    with pytest.raises(ValidationError):
        AuthConfig.model_validate({"apiKeyFile": "/k.json"})


def test_no_credentials_configured_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="apiKeysFile"):
        Authenticator(AuthConfig())


def test_hash_key_prints_the_hash_or_a_keys_file_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-key\n"))
    assert hash_key_main([]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"s3cret-key").hexdigest()

    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-key\n"))
    assert hash_key_main(["--user", "frank", "--tier", "pro"]) == 0
    entry = json.loads(capsys.readouterr().out)
    auth = Authenticator(AuthConfig(api_keys_file=write_keys(tmp_path / "keys.json", [entry])))
    assert auth.authenticate("s3cret-key") == Principal("frank", "pro")

    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    with pytest.raises(SystemExit):
        hash_key_main([])


# --- JWT ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def jwt_auth(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Authenticator:
    (tmp_path / "hs256").write_bytes(SECRET + b"\n")  # `echo secret > file`: the newline is not the key
    jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True) | {
        "kid": "k1",
        "alg": "RS256",
        "use": "sig",
    }
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    config = JwtConfig(
        hs256_secret_file=tmp_path / "hs256",
        jwks_file=tmp_path / "jwks.json",
        issuer=ISSUER,
        audience=AUDIENCE,
    )
    return Authenticator(AuthConfig(jwt=config, default_tier="free"))


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "grace", "tier": "pro", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    return {k: v for k, v in (base | overrides).items() if v is not None}


def hs256(payload: dict[str, Any], secret: bytes = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def rs256(payload: dict[str, Any], key: rsa.RSAPrivateKey, kid: str | None = "k1") -> str:
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid} if kid else None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], sign: Any = None) -> str:
    """A token PyJWT would refuse to make: ``sign(signing_input) -> bytes`` or no signature at all."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode())) if sign else ''}"


def test_hs256_and_rs256_tokens_give_their_claims(
    jwt_auth: Authenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    assert jwt_auth.authenticate(hs256(claims())) == Principal("grace", "pro")
    assert jwt_auth.authenticate(rs256(claims(sub="heidi", tier=None), rsa_key)) == Principal("heidi", "free")


def test_rs256_without_kid_uses_the_only_key(jwt_auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    assert jwt_auth.authenticate(rs256(claims(), rsa_key, kid=None)).user_id == "grace"


def test_the_leeway_allows_a_little_clock_skew_and_no_more(jwt_auth: Authenticator) -> None:
    now = int(time.time())
    assert jwt_auth.authenticate(hs256(claims(exp=now - 10))).user_id == "grace"
    assert jwt_auth.authenticate(hs256(claims(nbf=now + 10))).user_id == "grace"
    assert status_of(jwt_auth, hs256(claims(exp=now - 60))) == 401
    assert status_of(jwt_auth, hs256(claims(nbf=now + 60))) == 401


@pytest.mark.parametrize(
    "change",
    [
        {"iss": "https://elsewhere.example"},
        {"iss": None},
        {"aud": "another-service"},
        {"aud": None},
        {"exp": None},  # a token that never expires is not accepted
    ],
    ids=["wrong-issuer", "no-issuer", "wrong-audience", "no-audience", "no-exp"],
)
def test_claims_that_do_not_match_the_config_are_401(jwt_auth: Authenticator, change: dict[str, Any]) -> None:
    assert status_of(jwt_auth, hs256(claims(**change))) == 401


def test_forged_signatures_are_401(
    jwt_auth: Authenticator, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    assert status_of(jwt_auth, hs256(claims(), b"someone-else's-secret-of-some-length")) == 401
    assert status_of(jwt_auth, rs256(claims(), other_rsa_key)) == 401  # right kid, wrong key
    assert status_of(jwt_auth, rs256(claims(), rsa_key, kid="k2")) == 401  # a kid nobody configured
    header, _, signature = hs256(claims()).split(".")
    tampered = b64(json.dumps(claims(sub="mallory")).encode())
    assert status_of(jwt_auth, f"{header}.{tampered}.{signature}") == 401
    assert status_of(jwt_auth, "not.a.jwt") == 401


def test_alg_none_is_401(jwt_auth: Authenticator) -> None:
    for alg in ("none", "None", "NONE"):
        assert status_of(jwt_auth, handmade({"alg": alg, "typ": "JWT"}, claims())) == 401


def test_an_hs256_token_signed_with_the_rsa_public_key_is_401(
    jwt_auth: Authenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    """Algorithm confusion: a verifier that took the header's alg and the RSA key as an HMAC secret
    would accept this token, which anyone holding the public key can make."""
    public = rsa_key.public_key()
    for encoding, fmt in (
        (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        (serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
    ):
        secret = public.public_bytes(encoding, fmt)
        token = handmade(
            {"alg": "HS256", "kid": "k1"},
            claims(),
            lambda data, s=secret: hmac.new(s, data, hashlib.sha256).digest(),
        )
        assert status_of(jwt_auth, token) == 401


def test_only_configured_algorithms_are_tried(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    (tmp_path / "hs256").write_bytes(SECRET)
    auth = Authenticator(AuthConfig(jwt=JwtConfig(hs256_secret_file=tmp_path / "hs256")))
    assert auth.authenticate(hs256(claims(iss=None, aud=None))).user_id == "grace"
    assert status_of(auth, rs256(claims(iss=None, aud=None), rsa_key)) == 401
    assert status_of(auth, jwt.encode(claims(iss=None, aud=None), SECRET, algorithm="HS512")) == 401
    assert status_of(auth, "an-api-key") == 401  # no keys file: no API keys at all


def test_a_claim_that_is_no_usable_user_id_is_403(jwt_auth: Authenticator) -> None:
    assert status_of(jwt_auth, hs256(claims(sub="a/b"))) == 403
    assert status_of(jwt_auth, hs256(claims(sub="x" * 129))) == 403
    assert status_of(jwt_auth, hs256(claims(sub=None))) == 403
    assert status_of(jwt_auth, hs256(claims(tier=["pro"]))) == 403


def test_a_rotated_jwks_file_is_read_again(
    tmp_path: Path, jwt_auth: Authenticator, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    jwk = RSAAlgorithm.to_jwk(other_rsa_key.public_key(), as_dict=True) | {"kid": "k2", "alg": "RS256"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    assert jwt_auth.authenticate(rs256(claims(), other_rsa_key, kid="k2")).user_id == "grace"
    assert status_of(jwt_auth, rs256(claims(), rsa_key)) == 401


def test_a_custom_user_claim(tmp_path: Path) -> None:
    (tmp_path / "hs256").write_bytes(SECRET)
    config = JwtConfig(hs256_secret_file=tmp_path / "hs256", user_claim="email", tier_claim="plan")
    auth = Authenticator(AuthConfig(jwt=config))
    token = hs256(claims(iss=None, aud=None, email="ivan@example.org", plan="team"))
    assert auth.authenticate(token) == Principal("ivan@example.org", "team")
