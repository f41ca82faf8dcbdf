"""Errors in OpenAI's JSON shape, {"error": {"message", "type", "param", "code"}}, with the right status.

400 a bad request (the message names the field or limit), 401 a missing or wrong API key,
404 an unknown model or route, 413 a body or image over its size limit, 429 a full queue,
408 a request that did not arrive in time, 503 an engine that is loading or stopped or a server at
its connection limit, 500 a bug (the message says so). Messages are always encodable: what a
request held that UTF-8 cannot encode is echoed as escapes.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse

from pixtral.errors import ContextLengthError, ImageError, ImageTooLargeError, RequestError

TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
    422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, code=self.code, param=self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": encodable(message), "type": TYPES.get(status, "invalid_request_error"),
                      "param": encodable(param) if param is not None else None, "code": code}}


def encodable(text: str) -> str:
    """`text` with what UTF-8 cannot encode (lone surrogates echoed from a request) written as escapes,
    so that an error message is always valid JSON."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def from_pixtral_error(exc: Exception, param: str | None = None) -> APIError:
    """Map the library's user-facing errors to HTTP (`param`: the request field at fault, if known)."""
    from pixtral.engine.async_engine import EngineDeadError, QueueFullError

    message = str(exc)
    if isinstance(exc, ContextLengthError):
        return APIError(400, message, code="context_length_exceeded", param=param or "messages")
    if isinstance(exc, ImageError):
        if isinstance(exc, ImageTooLargeError):
            return APIError(413, message, code="image_too_large", param="messages")
        return APIError(400, message, code="invalid_image", param="messages")
    if isinstance(exc, RequestError):
        named = re.match(r"'(\w+)'", message)  # SamplingParams names the field first: "'top_p' must be ..."
        return APIError(400, message, code="invalid_request", param=named.group(1) if named else param)
    if isinstance(exc, QueueFullError):
        return APIError(429, message, code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, EngineDeadError):
        return APIError(503, message, code="engine_unavailable")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
