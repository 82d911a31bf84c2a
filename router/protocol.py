"""The OpenAI requests the router serves, as pydantic models: the validation and the OpenAPI schema come from them.

Each model allows extra fields (``extra="allow"``). It checks what the router reads (the model, the messages or the
input) and the sampling parameters whose ranges OpenAI (and vLLM, for its extras) documents; a value out of range
is the client's error (400), not the engine's. Scalars are strict: a string is not a number and ``true`` is not 1.

``parse_request`` parses a body, validates it against its model and returns the parsed body, not the model, so
that the fields the router does not interpret reach the engine as the client sent them. Handlers read the body
themselves rather than through a FastAPI body parameter: authentication and the rate limit come before the body is
read, the size limit applies while it is read, and every malformed request is answered in OpenAI's error format.

A Responses request must be routable statelessly: fields that need stored state are refused, naming the field
(the router keeps nothing between requests, and an engine restart would lose anything it kept). Input items are
checked only as far as routing and the episode key read them (a message's role and content, a function call's
ids); item types the router does not know pass through.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
)
from pydantic.json_schema import SkipJsonSchema, models_json_schema
from pydantic_core import PydanticCustomError
from starlette.requests import Request

from router.errors import APIError

Str = Annotated[str, Strict()]
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Num = Annotated[float, Strict(), AllowInfNan(False)]  # an integer is a number too


class OpenAIModel(BaseModel):
    """A request body, or a part of one: the fields below are checked, any other is allowed and passed on."""

    model_config = ConfigDict(extra="allow")


class Routed(OpenAIModel):
    """What every request the router routes has: the model it names, and whether the answer streams."""

    model: Str = Field(min_length=1, description="a skill alias ('auto', 'coder' ...), or a served elite's id")
    stream: Bool = False


class Sampling(OpenAIModel):
    """Sampling parameters with documented ranges (OpenAI's, and vLLM's for its extras)."""

    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    temperature: Num | None = Field(None, ge=0, le=2)
    top_p: Num | None = Field(None, gt=0, le=1)
    n: Int | None = Field(None, ge=1, le=128)
    best_of: Int | None = Field(None, ge=1, le=128)
    presence_penalty: Num | None = Field(None, ge=-2, le=2)
    frequency_penalty: Num | None = Field(None, ge=-2, le=2)
    repetition_penalty: Num | None = Field(None, gt=0, le=2)
    top_k: Int | None = Field(None, ge=-1, description="-1 or 0: off")
    min_p: Num | None = Field(None, ge=0, le=1)
    seed: Int | None = None
    stop: Str | list[Str] | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    stream_options: dict[str, Any] | None = None
    user: Str | None = None


# -- chat and completions ------------------------------------------------------------------------------------------
class ChatMessage(OpenAIModel):
    role: Str
    content: Str | list[Any] | None = None


class ChatCompletionRequest(Sampling, Routed):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Bool | None = None


class CompletionRequest(Sampling, Routed):
    """``POST /v1/completions``."""

    prompt: Str | Annotated[list[Str | Int], Field(min_length=1)] = Field(
        description="a string, or an array of strings or token ids"
    )
    logprobs: Int | None = Field(None, ge=0, le=20)


# -- responses -----------------------------------------------------------------------------------------------------
STATELESS = "this router is stateless and stores no responses"
#: Content parts that carry text (their ``text`` must be a string: the classifier and the episode key read it).
TEXT_PARTS = {"input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text"}


def _never(message: str) -> Callable[[Any], Any]:
    def fail(_value: Any) -> Any:
        raise PydanticCustomError("invalid_value", message)

    return fail


def _refused(why: str, when: Callable[[Any], bool] = lambda v: v is not None) -> BeforeValidator:
    def check(value: Any) -> Any:
        if when(value):
            raise PydanticCustomError("unsupported_parameter", why)
        return value

    return BeforeValidator(check)


class TextPart(OpenAIModel):
    type: Str
    text: Str


class OtherPart(OpenAIModel):
    type: Str = Field(json_schema_extra={"not": {"enum": sorted(TEXT_PARTS)}})


def _part_kind(part: Any) -> str:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        return "untyped part"
    return "text part" if part["type"] in TEXT_PARTS else "other part"


#: A content part, tagged by what the router checks of it (a tag, with its space, is never read as a field name).
ContentPart = Annotated[
    Annotated[TextPart, Tag("text part")]
    | Annotated[OtherPart, Tag("other part")]
    | Annotated[Any, AfterValidator(_never("must be an object with a string 'type' (e.g. input_text)")),
                SkipJsonSchema(), Tag("untyped part")],
    Discriminator(_part_kind),
]  # fmt: skip


class InputMessage(OpenAIModel):
    type: Literal["message"] = "message"
    role: Str = Field(description="user, assistant, system or developer")
    content: Str | list[ContentPart]


class FunctionCall(OpenAIModel):
    type: Literal["function_call"]
    call_id: Str
    name: Str
    arguments: Str


class FunctionCallOutput(OpenAIModel):
    type: Literal["function_call_output"]
    call_id: Str
    output: Str | list[Any]


class OtherItem(OpenAIModel):
    """An item type the router does not read (reasoning, ...): passed through."""

    type: Str = Field(json_schema_extra={"not": {"enum": ["message", "function_call", "function_call_output",
                                                          "item_reference"]}})  # fmt: skip


#: Input item types that point at stored state: refused like ``previous_response_id``.
STATEFUL_ITEMS = {"item_reference"}
_ITEM_TAGS = {"message": "message item", "function_call": "function call", "function_call_output": "function output"}


def _item_kind(item: Any) -> str:
    if not isinstance(item, dict):
        return "not an object"
    kind = item.get("type", "message")
    if isinstance(kind, str) and kind in STATEFUL_ITEMS:
        return "stateful item"
    return _ITEM_TAGS.get(kind, "other item") if isinstance(kind, str) else "other item"


def _stateful(item: Any) -> Any:
    raise PydanticCustomError(
        "unsupported_parameter", f"'{item['type']}' items are not supported: {STATELESS}; send the referenced item "
        "itself",
    )  # fmt: skip


InputItem = Annotated[
    Annotated[InputMessage, Tag("message item")]
    | Annotated[FunctionCall, Tag("function call")]
    | Annotated[FunctionCallOutput, Tag("function output")]
    | Annotated[OtherItem, Tag("other item")]
    | Annotated[Any, AfterValidator(_stateful), SkipJsonSchema(), Tag("stateful item")]
    | Annotated[Any, AfterValidator(_never("must be an object (an input item)")), SkipJsonSchema(),
                Tag("not an object")],
    Discriminator(_item_kind),
]  # fmt: skip


class ResponsesRequest(Sampling, Routed):
    """``POST /v1/responses``: OpenAI's Responses API, stateless. ``previous_response_id``, ``conversation``,
    ``store: true``, ``background: true`` and ``prompt`` are refused (400); send the whole conversation as ``input``.
    Function tools, ``function_call`` and ``function_call_output`` items pass through to the engine unchanged."""

    input: Str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: Str | None = None
    max_output_tokens: Int | None = Field(None, ge=1)
    parallel_tool_calls: Bool | None = None
    tools: list[dict[str, Any]] | None = None
    previous_response_id: Annotated[
        None,
        _refused(f"not supported: {STATELESS}; send the full conversation as 'input' instead (the earlier input "
                 "items, then each response's output items and your function_call_output items)"),
    ] = None  # fmt: skip
    conversation: Annotated[
        None, _refused(f"not supported: {STATELESS}; send the full conversation as 'input' instead")
    ] = None
    store: Annotated[
        Literal[False] | None,
        _refused(f"true is not supported: {STATELESS}; omit 'store' or set it to false, and send the full "
                 "conversation as 'input' on every turn", when=lambda v: v is True),
    ] = None  # fmt: skip
    background: Annotated[
        Literal[False] | None,
        _refused("true is not supported: responses are answered in the foreground only (they cannot be polled "
                 "later); omit it or set it to false, and set 'stream': true for long answers",
                 when=lambda v: v is True),
    ] = None  # fmt: skip
    prompt: Annotated[
        None,
        _refused("stored prompt templates are not supported: the router has no stored prompts; send 'instructions' "
                 "and 'input' instead"),
    ] = None  # fmt: skip


#: The request model of each routed kind.
REQUESTS: dict[str, type[Routed]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
    "responses": ResponsesRequest,
}


# -- reading and parsing -------------------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The request's body; APIError 413 as soon as it is larger than ``limit`` bytes (as declared, or as it comes)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body exceeds {limit} bytes", "request_too_large")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise APIError(413, f"request body exceeds {limit} bytes", "request_too_large")
    return raw


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; send a finite number")


#: One decoder for every body (``json.loads`` with a keyword builds a new one per call).
_DECODER = json.JSONDecoder(parse_constant=_not_a_number)


def parse_json(raw: bytes) -> Any:
    """The request body as JSON; NaN and Infinity (which Python's parser accepts) are refused like any bad JSON."""
    try:
        return _DECODER.decode(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from exc


def parse_request(raw: bytes, kind: str) -> dict[str, Any]:
    """The parsed body of a request of ``kind`` (chat, completions, responses), validated against its model;
    APIError 400 naming the field (``param``, e.g. ``input[1].call_id``) otherwise."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        REQUESTS[kind].model_validate(body)
    except ValidationError as exc:
        raise invalid(exc) from None
    return body


#: Names pydantic gives the members of a union in an error's location (not fields of the request).
_MEMBER_NAMES = {"str", "int", "float", "bool", "none", "bytes"}


def _path(loc: tuple[str | int, ...]) -> list[str | int]:
    """The location with the union members' names left out: fields and indices only."""
    return [p for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _MEMBER_NAMES)]


def _param(path: list[str | int]) -> str | None:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or None


def invalid(exc: ValidationError) -> APIError:
    """One 400 for a validation failure: the first field with errors, at the deepest place they reached (of the
    members of a union, the one that matched furthest), with every message given there."""
    errors = exc.errors(include_url=False)
    field = errors[0]["loc"][:1]
    mine = [(e, _path(e["loc"])) for e in errors if e["loc"][:1] == field]
    deepest = max(len(p) for _, p in mine)
    here = [(e, p) for e, p in mine if len(p) == deepest]
    param = _param(here[0][1])
    messages = []
    for e, _ in here:
        msg = e["msg"]
        if e["type"] != "missing" and not e["type"].startswith(("unsupported", "invalid")):
            msg += f" (got {json.dumps(e['input'], default=str)[:80]})"
        if msg not in messages:
            messages.append(msg)
    kind = here[0][0]["type"]
    code = kind if kind in ("unsupported_parameter", "invalid_value") else (
        "invalid_type" if kind == "missing" or kind.endswith("_type") else "invalid_value"
    )  # fmt: skip
    text = "; or ".join(messages)
    return APIError(400, f"'{param}': {text}" if param else text, code, param)


def request_schemas() -> dict[str, Any]:
    """The request models' JSON schemas (and those of their parts), for the OpenAPI document's components."""
    _, top = models_json_schema(
        [(m, "validation") for m in REQUESTS.values()], ref_template="#/components/schemas/{model}"
    )
    return top["$defs"]


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """A route's ``openapi_extra``: its JSON body is ``model``."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}
