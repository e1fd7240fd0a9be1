"""Request validation (shared by worker and client): what may reach a handler."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from streamqueue import wire

SAFE = re.compile(r"[A-Za-z0-9_.@-]{1,128}")


@given(user_id=st.text(max_size=200))
def test_only_safe_user_ids_pass(user_id: str) -> None:
    rejection = wire.user_id_rejection(user_id)
    assert (rejection is None) == bool(SAFE.fullmatch(user_id))
    if rejection is not None:
        assert rejection.reason in (wire.REASON_MISSING_USER_ID, wire.REASON_INVALID_USER_ID)


@given(message=st.text(max_size=300), limit=st.integers(1, 400))
def test_message_size_is_counted_in_utf8_bytes(message: str, limit: int) -> None:
    rejection = wire.validate_request({wire.USER_ID: "u", wire.MESSAGE: message}, limit)
    too_big = len(message.encode("utf-8", "surrogateescape")) > limit
    assert (rejection is not None) == too_big
    if too_big:
        assert rejection.reason == wire.REASON_MESSAGE_TOO_LARGE


def test_missing_fields_have_their_own_reasons() -> None:
    assert wire.validate_request({wire.MESSAGE: "x"}, 10).reason == wire.REASON_MISSING_USER_ID
    assert wire.validate_request({wire.USER_ID: "u"}, 10).reason == wire.REASON_MISSING_MESSAGE
    assert wire.validate_request({wire.USER_ID: "u", wire.MESSAGE: ""}, 10) is None


# Test vectors for producers in other languages (CRC-32/IEEE of the UTF-8 user id).
@pytest.mark.parametrize(
    ("user_id", "partitions", "expected"),
    [("alice", 4, 3), ("alice", 16, 7), ("bob", 4, 0), ("user-00", 16, 11), ("Ünïcode", 16, 12), ("x", 1, 0)],
)
def test_partition_of_is_crc32_of_the_utf8_user_id(user_id: str, partitions: int, expected: int) -> None:
    assert wire.partition_of(user_id, partitions) == expected


@given(st.text(min_size=1, max_size=40), st.integers(min_value=1, max_value=64))
def test_every_user_has_exactly_one_partition_in_range(user_id: str, partitions: int) -> None:
    assert 0 <= wire.partition_of(user_id, partitions) < partitions


def test_partition_keys_keep_one_partition_unchanged_and_hash_tag_the_rest() -> None:
    assert wire.partition_streams("user_messages_queue", 1) == ["user_messages_queue"]
    assert wire.partition_streams("q", 3) == ["q:{0}", "q:{1}", "q:{2}"]
    assert wire.dead_letter_stream(wire.partition_stream("q", 2, 3)) == "q:{2}:dead"
    with pytest.raises(ValueError, match="at least 1"):
        wire.partition_of("alice", 0)


def _hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes (its documented rule)."""
    opening = key.find("{")
    if opening != -1:
        closing = key.find("}", opening + 1)
        if closing > opening + 1:
            return key[opening + 1 : closing]
    return key


@given(st.text(alphabet=st.characters(blacklist_characters="{}"), min_size=1), st.integers(1, 64))
def test_derived_keys_share_their_streams_hash_slot(stream: str, partitions: int) -> None:
    for key in wire.partition_streams(stream, partitions):
        for derived in (wire.fair_key(key), wire.fair_clock_key(key), wire.limits_key(key)):
            assert derived != key
            assert _hash_tag(derived) == _hash_tag(key)


def test_a_key_with_unmatched_braces_has_no_same_slot_key() -> None:
    assert wire.same_slot_key("a{b}c", ":x") == "a{b}c:x"
    for bad in ("a}b", "a{b", "a{}b"):
        with pytest.raises(ValueError, match="braces"):
            wire.same_slot_key(bad, ":x")


@pytest.mark.parametrize(
    ("chat", "reason"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}', None),
        ("not json", wire.REASON_INVALID_CHAT),
        ('{"messages": []}', wire.REASON_INVALID_CHAT),
        ('{"messages": ["hi"]}', wire.REASON_INVALID_CHAT),
        ('["messages"]', wire.REASON_INVALID_CHAT),
        ('{"messages": [{"content": "hi"}], "max_tokens": 16}', None),
        ('{"messages": [{"content": "hi"}], "max_tokens": null}', None),
        ('{"messages": [{"content": "hi"}], "max_tokens": "16"}', wire.REASON_INVALID_CHAT),
        ('{"messages": [{"content": "hi"}], "max_tokens": 1.5}', wire.REASON_INVALID_CHAT),
        ('{"messages": [{"content": "hi"}], "max_tokens": 0}', wire.REASON_INVALID_CHAT),
        ('{"messages": [{"content": "hi"}], "max_tokens": true}', wire.REASON_INVALID_CHAT),
        ('{"messages": [{"content": "' + "x" * 100 + '"}]}', wire.REASON_MESSAGE_TOO_LARGE),
    ],
)
def test_a_chat_must_be_an_object_with_messages_within_the_limit(chat: str, reason: str | None) -> None:
    fields = {wire.USER_ID: "alice", wire.MESSAGE: "hi", wire.CHAT: chat}
    rejection = wire.validate_request(fields, max_message_bytes=100)
    assert (rejection.reason if rejection else None) == reason
