"""Model-API limits shared by every worker of a queue: requests and tokens per minute, concurrent calls,
and the pause a 429 imposes on all of them (docs/ai.md, "Model-API limits").

Modules: ``scripts`` (the Lua that decides in Redis), ``calls`` (``ModelLimits``: one worker's poller
and call leases), ``retry`` (the handlers' retry policy: ``Retryable``, ``back_off``, Retry-After).

The state lives in Redis, in three keys of the queue's hash slot (``wire.limits_key``,
``wire.limit_calls_key``, ``wire.limit_bound_key``), so one Lua script decides each call atomically on
a single server and on a Redis Cluster alike, with the time of Redis (``TIME``), never a pod's clock:

- a shared pause (``pause_until``, ms): set by ``pause`` to max(the pause already set, now + seconds);
- requests per minute: GCRA with an emission interval of 60,000/RPM ms and a burst of
  ``request_burst(rpm)`` (10 ms worth of calls, at least 1: at 6,000 RPM or less calls are evenly
  spaced, so a provider measuring any window, a minute or a second, sees at most its share);
- tokens per minute: a bucket of RPM-like refill holding at most one minute of tokens. A call may start
  while the bucket is positive; the handler reports the tokens it used (``Call.report_tokens``) and
  they are debited when the call ends, so a large reply puts the bucket in debt and later calls wait;
- concurrent calls: a sorted set of call leases (score: expiry in ms), renewed while the call runs, so
  the slots of a worker that crashed free themselves ``lease_ms`` later.

A call that must wait learns how long and which limit binds; the script then SETs ``limit_bound_key``
to that ``wire.LIMIT_*`` reason with PX ``wire.LIMIT_BOUND_TTL_MS``, which the operator reads (a
limit-bound queue is not scaled up). Waiting does not hammer Redis: per ``ModelLimits`` one coroutine
polls on behalf of a local FIFO of waiting calls, grants as many as the limits allow in one round trip,
and sleeps the wait the script hinted (for the concurrency limit a bounded poll, cut short when a local
call ends).

If Redis cannot be reached while a call waits to start, the call fails with ``LimitsUnavailable``:
the handler fails, the entry stays pending and is retried. A model is never called unlimited because
the limits could not be checked.
"""

from .calls import CALL_LEASE_MS, CONCURRENCY_POLL_MS, MAX_GRANT, Call, LimitsUnavailable, ModelLimits
from .retry import RETRY_AFTER_CAP_S, Retryable, back_off, retry_after_seconds
from .scripts import BURST_MS, request_burst

__all__ = [
    "BURST_MS", "CALL_LEASE_MS", "CONCURRENCY_POLL_MS", "MAX_GRANT", "RETRY_AFTER_CAP_S", "Call",
    "LimitsUnavailable", "ModelLimits", "Retryable", "back_off", "request_burst", "retry_after_seconds",
]  # fmt: skip
