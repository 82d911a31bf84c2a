"""The OpenAI side of the wire: error types and bodies, request validation, the documented request schemas, and
the text of a request the classifier reads.

The handlers parse raw JSON themselves (not a pydantic body model), so that every malformed request is answered in
OpenAI's error format, and fields the router does not interpret reach the engine byte-for-byte unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
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


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": code}}


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None, **hdr: str
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=hdr or None)


def parse_json(raw: bytes) -> Any:
    """The request body as JSON; NaN and Infinity (which Python's parser accepts) are refused like any bad JSON."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number; send a finite number")

    try:
        return json.loads(raw, parse_constant=refuse)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from exc


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _stop(v: Any) -> bool:
    return v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))


#: Sampling parameters the router checks before routing (OpenAI's documented ranges, and vLLM's for its extras):
#: name -> (test, what a valid value is). A value out of range is the client's error (400), not the engine's.
SAMPLING: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_tokens": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1"),
    "max_completion_tokens": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1"),
    "temperature": (lambda v: v is None or (_is_num(v) and 0 <= v <= 2), "a number from 0 to 2"),
    "top_p": (lambda v: v is None or (_is_num(v) and 0 < v <= 1), "a number in (0, 1]"),
    "n": (lambda v: v is None or (_is_int(v) and 1 <= v <= 128), "an integer from 1 to 128"),
    "best_of": (lambda v: v is None or (_is_int(v) and 1 <= v <= 128), "an integer from 1 to 128"),
    "presence_penalty": (lambda v: v is None or (_is_num(v) and -2 <= v <= 2), "a number from -2 to 2"),
    "frequency_penalty": (lambda v: v is None or (_is_num(v) and -2 <= v <= 2), "a number from -2 to 2"),
    "repetition_penalty": (lambda v: v is None or (_is_num(v) and 0 < v <= 2), "a number in (0, 2]"),
    "top_k": (lambda v: v is None or (_is_int(v) and v >= -1), "an integer >= -1 (-1 or 0: off)"),
    "min_p": (lambda v: v is None or (_is_num(v) and 0 <= v <= 1), "a number from 0 to 1"),
    "seed": (lambda v: v is None or _is_int(v), "an integer"),
    "stop": (_stop, "a string or an array of strings"),
    "top_logprobs": (lambda v: v is None or (_is_int(v) and 0 <= v <= 20), "an integer from 0 to 20"),
    "stream_options": (lambda v: v is None or isinstance(v, dict), "an object"),
    "user": (lambda v: v is None or isinstance(v, str), "a string"),
}
#: ``logprobs`` is a flag in chat and a count in completions.
LOGPROBS = {
    "chat": (lambda v: v is None or isinstance(v, bool), "a boolean"),
    "completions": (lambda v: v is None or (_is_int(v) and 0 <= v <= 20), "an integer from 0 to 20"),
}


def validate_sampling(body: dict[str, Any], kind: str) -> None:
    for name, (ok, what) in (*SAMPLING.items(), ("logprobs", LOGPROBS[kind])):
        if name in body and not ok(body[name]):
            raise APIError(400, f"'{name}' must be {what}, got {json.dumps(body[name])[:80]}", "invalid_value", name)


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
    validate_sampling(body, kind)
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
_SAMPLING_SCHEMA = {
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1, "maximum": 128},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "stop": {"type": "array", "items": {"type": "string"}},
    "seed": {"type": "integer"},
}
CHAT_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "items": MESSAGE_SCHEMA, "minItems": 1},
        "stream": {"type": "boolean"},
        "logprobs": {"type": "boolean"},
        **_SAMPLING_SCHEMA,
    },
    "required": ["model", "messages"],
}
COMPLETION_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "prompt": {"type": "string"},
        "stream": {"type": "boolean"},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        **_SAMPLING_SCHEMA,
    },
    "required": ["model", "prompt"],
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    str(s): {"description": ERROR_TYPES[s]} for s in (400, 401, 404, 413, 429, 500, 502, 503, 504)
}


def body_doc(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
