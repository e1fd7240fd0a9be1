"""Request validation (shared by worker and client): what may reach a handler."""

from __future__ import annotations

import re

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
