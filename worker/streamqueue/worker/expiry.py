"""Requests whose time ran out: which entries are too old to be worth a model call (their user gets
``replies.unanswered_fields`` instead).

Two limits, either may be unset: the queue's ``max_queue_age_seconds`` (``spec.worker.
maxQueueAgeSeconds``) and the request's own ``deadline`` field (``wire.DEADLINE``: Unix time in ms,
set by the client). A request's age is measured from the time in its entry id, which Redis sets at
XADD from its own clock, not from the ``timestamp`` field, which is whatever the producer wrote
(the article's producers write seconds as a float; other producers, anything or nothing). Both
limits are compared with this worker's clock, so clock skew between the worker's and Redis's (or
the client's) hosts shifts them by that much.
"""

from __future__ import annotations

from collections.abc import Mapping

from .. import wire


def expired_reason(
    entry_id: str, fields: Mapping[str, str], max_age_ms: float | None, now_ms: float
) -> str | None:
    """Which limit the entry is past at ``now_ms`` (``wire.EXPIRED_*``), or None if it is in time.

    The request's own deadline is checked first: it is what its client asked for. ``fields`` were
    validated (``wire.validate_request``), so a deadline present is an integer.
    """
    deadline = fields.get(wire.DEADLINE)
    if deadline is not None and now_ms > int(deadline):
        return wire.EXPIRED_DEADLINE
    if max_age_ms is not None and now_ms - wire.parse_entry_id(entry_id)[0] > max_age_ms:
        return wire.EXPIRED_QUEUE_AGE
    return None
