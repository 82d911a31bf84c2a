"""The OpenAI side of the wire: error types and bodies, request validation, the documented request schemas, and
the text of a request the classifier reads.

The handlers parse raw JSON themselves (not a pydantic body model), so that every malformed request is answered in
OpenAI's error format, and fields the router does not interpret reach the engine byte-for-byte unchanged.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
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


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": code}}


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None, **hdr: str
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=hdr or None)


def validate_body(body: Any, kind: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise APIError(400, "'model' is required and must be a non-empty string", "invalid_type", "model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise APIError(400, "'stream' must be a boolean", "invalid_type", "stream")
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError(400, "'messages' is required and must be a non-empty array", "invalid_type", "messages")
        for i, msg in enumerate(msgs):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise APIError(
                    400, f"messages[{i}] must be an object with a string 'role'", "invalid_type", f"messages[{i}]"
                )
            if not isinstance(msg.get("content"), str | list | type(None)):
                raise APIError(
                    400,
                    f"messages[{i}].content must be a string, an array or null",
                    "invalid_type",
                    f"messages[{i}].content",
                )
    else:
        prompt = body.get("prompt")
        ok = isinstance(prompt, str) or (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(p, str | int) and not isinstance(p, bool) for p in prompt)
        )
        if not ok:
            raise APIError(
                400, "'prompt' is required: a string or an array of strings or token ids", "invalid_type", "prompt"
            )
    return body


def request_text(body: dict[str, Any]) -> str:
    """The text the classifier reads: the conversation's first user message (stable over an episode's turns)."""
    if "messages" in body:
        for msg in body["messages"]:
            if msg.get("role") == "user":
                return content_text(msg.get("content"))
        return content_text(body["messages"][0].get("content"))
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else (prompt[0] if prompt and isinstance(prompt[0], str) else "")


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


# --- the OpenAPI schema of the two POST bodies (documentation, and what schemathesis generates requests from) ---
MESSAGE_SCHEMA = {
    "type": "object",
    "properties": {"role": {"type": "string"}, "content": {"type": ["string", "null"]}},
    "required": ["role", "content"],
}
CHAT_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "items": MESSAGE_SCHEMA, "minItems": 1},
        "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer"},
        "temperature": {"type": "number"},
    },
    "required": ["model", "messages"],
}
COMPLETION_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "prompt": {"type": "string"},
        "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer"},
    },
    "required": ["model", "prompt"],
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    str(s): {"description": ERROR_TYPES[s]} for s in (400, 401, 404, 413, 429, 502, 503, 504)
}


def body_doc(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
