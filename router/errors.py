"""OpenAI's error format: every failure, whatever raised it, answers ``{"error": {message, type, param, code}}``.

``APIError`` is raised anywhere below a route (validation, the decision, the relay, feedback); the app's exception
handlers turn it, Starlette's own HTTP errors and anything unexpected into that body.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the client in OpenAI's format; raise it anywhere below a route."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.code, self.param, **(self.headers or {}))


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": code}}


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None, **hdr: str
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=hdr or None)


#: The error statuses the OpenAI routes document (each answers the body above).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    str(s): {"description": ERROR_TYPES[s]} for s in (400, 401, 404, 413, 429, 500, 502, 503, 504)
}
