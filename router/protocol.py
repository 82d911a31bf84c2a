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
#: The Responses API's own names for what chat calls ``max_tokens`` and friends (``SAMPLING`` applies as well).
RESPONSES_SAMPLING: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_output_tokens": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1"),
    "instructions": (lambda v: v is None or isinstance(v, str), "a string"),
    "parallel_tool_calls": (lambda v: v is None or isinstance(v, bool), "a boolean"),
    "tools": (
        lambda v: v is None or (isinstance(v, list) and all(isinstance(t, dict) for t in v)),
        "an array of objects",
    ),
}


def validate_sampling(body: dict[str, Any], kind: str) -> None:
    checks = (*SAMPLING.items(), *RESPONSES_SAMPLING.items()) if kind == "responses" else (
        *SAMPLING.items(), ("logprobs", LOGPROBS[kind]),
    )  # fmt: skip
    for name, (ok, what) in checks:
        if name in body and not ok(body[name]):
            raise APIError(400, f"'{name}' must be {what}, got {json.dumps(body[name])[:80]}", "invalid_value", name)


def validate_body(body: Any, kind: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise APIError(400, "'model' is required and must be a non-empty string", "invalid_type", "model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise APIError(400, "'stream' must be a boolean", "invalid_type", "stream")
    if kind == "responses":
        validate_responses(body)
    elif kind == "chat":
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


#: Fields of a Responses request that need state the router does not keep: name -> (refused when, why and what to
#: send instead). The router is stateless (replicas share nothing, an engine restart loses its memory), so a
#: conversation travels whole in every request, as chat does.
STATELESS = "this router is stateless and stores no responses"
RESPONSES_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "previous_response_id": (
        lambda v: v is not None,
        f"'previous_response_id' is not supported: {STATELESS}; send the full conversation as 'input' instead "
        "(the earlier input items, then each response's output items and your function_call_output items)",
    ),
    "conversation": (
        lambda v: v is not None,
        f"'conversation' is not supported: {STATELESS}; send the full conversation as 'input' instead",
    ),
    "store": (
        lambda v: v is True,
        f"'store': true is not supported: {STATELESS}; omit 'store' or set it to false, and send the full "
        "conversation as 'input' on every turn",
    ),
    "background": (
        lambda v: v is True,
        "'background': true is not supported: responses are answered in the foreground only (they cannot be "
        "polled later); omit it or set it to false, and set 'stream': true for long answers",
    ),
    "prompt": (
        lambda v: v is not None,
        "'prompt' (a stored prompt template) is not supported: the router has no stored prompts; send "
        "'instructions' and 'input' instead",
    ),
}
#: Input item types that point at stored state: refused like ``previous_response_id``.
STATEFUL_ITEMS = {"item_reference"}
_TEXT_PARTS = {"input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text"}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, "invalid_value", param)


def validate_responses(body: dict[str, Any]) -> None:
    """A Responses API request the router can route statelessly: refused fields first, then the shape of ``input``.

    Items are checked only as far as routing and the episode key read them (a message's role and content, a
    function call's ids); every other field, and item types the router does not know, reach the engine unchanged.
    """
    for name, (refused, why) in RESPONSES_REFUSED.items():
        if refused(body.get(name)):
            raise APIError(400, why, "unsupported_parameter", name)
    inp = body.get("input")
    if isinstance(inp, str):
        return
    if not isinstance(inp, list) or not inp:
        raise _bad("input", "'input' is required: a string, or a non-empty array of input items")
    for i, item in enumerate(inp):
        at = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(at, f"{at} must be an object (an input item), got {json.dumps(item)[:60]}")
        kind = item.get("type", "message")
        if not isinstance(kind, str):
            raise _bad(f"{at}.type", f"{at}.type must be a string")
        if kind in STATEFUL_ITEMS:
            raise APIError(
                400, f"{at}: '{kind}' items are not supported: {STATELESS}; send the referenced item itself",
                "unsupported_parameter", at,
            )  # fmt: skip
        if kind == "message":
            if not isinstance(item.get("role"), str):
                raise _bad(f"{at}.role", f"{at} is a message: 'role' must be a string (user, assistant, system ...)")
            content = item.get("content")
            if not isinstance(content, str | list):
                raise _bad(f"{at}.content", f"{at}.content must be a string or an array of content parts")
            for j, part in enumerate(content if isinstance(content, list) else []):
                where = f"{at}.content[{j}]"
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise _bad(where, f"{where} must be an object with a string 'type' (e.g. input_text)")
                if part["type"] in _TEXT_PARTS and not isinstance(part.get("text"), str):
                    raise _bad(f"{where}.text", f"{where} is a {part['type']} part: 'text' must be a string")
        elif kind == "function_call":
            for f in ("call_id", "name", "arguments"):
                if not isinstance(item.get(f), str):
                    raise _bad(f"{at}.{f}", f"{at} is a function_call: '{f}' must be a string")
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _bad(f"{at}.call_id", f"{at} is a function_call_output: 'call_id' must be a string")
            if not isinstance(item.get("output"), str | list):
                raise _bad(f"{at}.output", f"{at} is a function_call_output: 'output' must be a string or an array")


def input_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A Responses request's conversation as chat-like messages (instructions first, as a system message); items
    that are not messages (function calls, their outputs, reasoning) are left out."""
    out: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        out.append({"role": "system", "content": body["instructions"]})
    inp = body.get("input")
    if isinstance(inp, str):
        return [*out, {"role": "user", "content": inp}]
    for item in inp if isinstance(inp, list) else []:
        if isinstance(item, dict) and item.get("type", "message") == "message":
            out.append({"role": item.get("role"), "content": item.get("content")})
    return out


def request_text(body: dict[str, Any], kind: str | None = None) -> str:
    """The text the classifier reads: the conversation's first user message (stable over an episode's turns); for a
    Responses request with no user message, its instructions."""
    if kind == "responses":
        msgs = input_messages(body)
        first = next((m for m in msgs if m["role"] == "user"), msgs[0] if msgs else None)
        return content_text(first["content"]) if first else ""
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
INPUT_MESSAGE_SCHEMA = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["message"]},
        "role": {"type": "string", "enum": ["user", "assistant", "system", "developer"]},
        "content": {"type": "string"},
    },
    "required": ["role", "content"],
}
RESPONSES_SCHEMA = {
    "type": "object",
    "description": "OpenAI's Responses API, stateless: previous_response_id, conversation, store: true, "
    "background: true and prompt are refused (400); send the whole conversation as input. Function tools, "
    "function_call and function_call_output items pass through to the engine unchanged.",
    "properties": {
        "model": {"type": "string"},
        "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": INPUT_MESSAGE_SCHEMA, "minItems": 1}]},
        "instructions": {"type": "string"},
        "stream": {"type": "boolean"},
        "store": {"type": "boolean", "enum": [False]},
        "max_output_tokens": {"type": "integer", "minimum": 1},
        "temperature": _SAMPLING_SCHEMA["temperature"],
        "top_p": _SAMPLING_SCHEMA["top_p"],
        "tools": {"type": "array", "items": {"type": "object"}},
        "parallel_tool_calls": {"type": "boolean"},
    },
    "required": ["model", "input"],
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    str(s): {"description": ERROR_TYPES[s]} for s in (400, 401, 404, 413, 429, 500, 502, 503, 504)
}


def body_doc(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
