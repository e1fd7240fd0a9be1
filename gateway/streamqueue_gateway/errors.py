"""Errors as OpenAI's API shapes them, so the ``openai`` SDK raises its usual exception classes.

Body ``{"error": {"message", "type", "param", "code"}}``; 429 and 503 carry ``Retry-After`` (whole
seconds, rounded up) so SDKs and browsers back off as told instead of on their own schedule.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


@dataclass(eq=False)  # compared by identity, as exceptions are
class ApiError(Exception):
    """A request the gateway answers with an error status (raised anywhere below a route)."""

    status: int
    message: str
    _: KW_ONLY
    type: str = "invalid_request_error"  # OpenAI's field name
    code: str | None = None
    param: str | None = None
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def error(self) -> dict[str, Any]:
        """OpenAI's error object."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def body(self) -> dict[str, Any]:
        return {"error": self.error()}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers(), dumps=json.dumps)


def not_found(what: str = "no such request") -> ApiError:
    """One answer for "unknown" and "not yours", so a request id reveals nothing about other users."""
    return ApiError(404, what, code="not_found")


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """ApiError -> its response; any other failure -> a 500 in the same shape (details only in the log)."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return ApiError(500, "internal error", type="server_error").response()
