"""The Responses API and tool loops through the router, against fake upstreams: routing and headers, stateless
refusals, episode affinity over a tool loop, tool fields forwarded unchanged, streams relayed byte for byte, and
clean breaks and retries."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from testkit.router_fakes import ToolCall, ToolScript
from tests.router.conftest import ELITES, write_manifest

SQL = "How many employees work in the sales department? Answer with one SQL query."
SHELL = "Show the number of lines in the file notes.txt in the current directory."
TOOLS = [{"type": "function", "name": "run_sql", "description": "Run one SQL query.", "strict": False,
          "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}]  # fmt: skip
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}]
SCRIPT = ToolScript([ToolCall("run_sql", '{"query": "SELECT COUNT(*) FROM employees"}')], final="{outputs} rows")


def client(r) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{r.url}/v1", api_key="none", max_retries=0)


def post(r, body, path="/v1/responses", **kw) -> httpx.Response:
    return httpx.post(f"{r.url}{path}", json=body, timeout=30, **kw)


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def scripted(upstreams, script: ToolScript = SCRIPT) -> None:
    for u in upstreams.values():
        u.script = script


# -- routing -------------------------------------------------------------------------------------------------------
def test_responses_are_routed_like_chat_and_forwarded_to_the_engines_responses_endpoint(start_router, upstreams):
    r = start_router()
    c = client(r)
    raw = c.responses.with_raw_response.create(model="auto", input=SQL, instructions="Be brief.", temperature=0.2)
    assert (raw.headers["x-cycleqd-elite"], raw.headers["x-cycleqd-reason"]) == ("querier", "classifier")
    weights = dict(kv.split("=") for kv in raw.headers["x-cycleqd-skill-weights"].split(","))
    assert max(weights, key=lambda k: float(weights[k])) == "db"
    assert raw.parse().output_text == "answer from querier"
    up = upstreams["querier"]
    assert up.received_paths[-1] == "/v1/responses"
    sent = up.received[-1]  # only model is rewritten, and store pinned to false (the router is stateless)
    assert sent == {"model": "served-querier", "input": SQL, "instructions": "Be brief.", "temperature": 0.2,
                    "store": False}  # fmt: skip
    # a list of input items, content as input_text parts, is classified by its first user message
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": SHELL}]}]
    raw = c.responses.with_raw_response.create(model="auto", input=items, instructions="You answer SQL questions.")
    assert raw.headers["x-cycleqd-elite"] == "sheller"
    # alias, weights header and pinned elite come before the classifier, as in chat
    assert c.responses.with_raw_response.create(model="sql", input=SHELL).headers["x-cycleqd-elite"] == "querier"
    h = c.responses.with_raw_response.create(
        model="auto", input=SQL, extra_headers={"x-cycleqd-skill-weights": "code=1"}
    ).headers
    assert (h["x-cycleqd-elite"], h["x-cycleqd-reason"]) == ("coder", "header")
    h = c.responses.with_raw_response.create(model="sheller", input=SQL).headers
    assert (h["x-cycleqd-elite"], h["x-cycleqd-reason"]) == ("sheller", "pinned")
    # documented in the OpenAPI schema
    spec = httpx.get(f"{r.url}/openapi.json").json()
    body = spec["paths"]["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ResponsesRequest"}  # the request model itself
    assert spec["components"]["schemas"]["ResponsesRequest"]["required"] == ["model", "input"]


def test_a_failing_engine_is_retried_before_the_first_byte_for_responses(start_router, upstreams):
    r = start_router()
    upstreams["querier"].mode = "error"
    raw = client(r).responses.with_raw_response.create(model="sql", input=SQL)
    assert raw.headers["x-cycleqd-reason"] == "alias:sql;fallback:1" and raw.headers["x-cycleqd-elite"] != "querier"
    assert upstreams["querier"].received_paths == ["/v1/responses"]
    for u in upstreams.values():
        u.mode = "error"
    err = assert_openai_error(post(r, {"model": "sql", "input": SQL}), 502)
    assert err["code"] == "upstream_error"


# -- stateless ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id", "send the full conversation as 'input'"),
        ({"conversation": "conv_1"}, "conversation", "send the full conversation as 'input'"),
        ({"store": True}, "store", "omit 'store' or set it to false"),
        ({"background": True}, "background", "foreground only"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt", "no stored prompts"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "send the referenced item"),
    ],
)
def test_stateful_fields_are_refused_naming_the_field(start_router, upstreams, extra, param, says):
    r = start_router()
    err = assert_openai_error(post(r, {"model": "auto", "input": SQL, **extra}), 400, param)
    assert err["code"] == "unsupported_parameter" and says in err["message"]
    assert not any(u.received for u in upstreams.values())  # refused before any engine saw it


def test_stateless_defaults_are_accepted(start_router):
    r = start_router()
    for extra in ({"store": False}, {"background": False}, {"previous_response_id": None}, {"conversation": None}):
        resp = post(r, {"model": "sql", "input": SQL, **extra})
        assert resp.status_code == 200 and resp.json()["object"] == "response", (extra, resp.text)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "auto"}, "input"),
        ({"model": "auto", "input": []}, "input"),
        ({"model": "auto", "input": 42}, "input"),
        ({"model": "auto", "input": ["hello"]}, "input[0]"),
        ({"model": "auto", "input": [{"content": "hi"}]}, "input[0].role"),
        ({"model": "auto", "input": [{"role": "user", "content": 3}]}, "input[0].content"),
        ({"model": "auto", "input": [{"role": "user", "content": [{"text": "hi"}]}]}, "input[0].content[0]"),
        ({"model": "auto", "input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
        ({"model": "auto", "input": [{"role": "user", "content": "q"}, {"type": "function_call_output", "output": "4"}]},
         "input[1].call_id"),
        ({"model": "auto", "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]},
         "input[0].arguments"),
        ({"model": "auto", "input": [{"type": 7}]}, "input[0].type"),
        ({"model": "auto", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "auto", "input": "hi", "temperature": 3}, "temperature"),
        ({"model": "auto", "input": "hi", "tools": {"type": "function"}}, "tools"),
        ({"model": "auto", "input": "hi", "instructions": ["be brief"]}, "instructions"),
        ({"model": "auto", "input": "hi", "stream": "yes"}, "stream"),
        ({"input": "hi"}, "model"),
    ],
)  # fmt: skip
def test_malformed_responses_requests_get_openai_errors_naming_the_field(start_router, upstreams, body, param):
    r = start_router()
    assert_openai_error(post(r, body), 400, param)
    assert not any(u.received for u in upstreams.values())


# -- episodes and tool loops -----------------------------------------------------------------------------------------
def test_every_turn_of_a_responses_tool_loop_lands_on_one_elite(start_router, upstreams):
    flat = {e: {"code": 0.9, "os": 0.9, "db": 0.9} for e in ELITES}  # all equal: only the hash or load decides
    r = start_router()
    write_manifest(r.router.policy.manifest, upstreams, scores=flat)
    r.router.refresh_manifest(force=True)
    c = client(r)
    spread = set()
    for i in range(8):
        task = f"Fix the failing test number {i}."
        first = c.responses.with_raw_response.create(model="sql", instructions=f"You are agent {i}.", input=task)
        spread.add(first.headers["x-cycleqd-elite"])
        r.router.inflight[first.headers["x-cycleqd-engine"]] += 100  # load on the chosen engine must not move turns
        # later turns: the string input rebuilt as an item list with input_text parts, plus the tool loop's items
        items: list = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": task}]}]
        for step in range(3):
            items += [
                {"type": "function_call", "call_id": f"c{step}", "name": "run_tests", "arguments": "{}"},
                {"type": "function_call_output", "call_id": f"c{step}", "output": f"1 failed (step {step})"},
            ]
            h = c.responses.with_raw_response.create(model="sql", instructions=f"You are agent {i}.", input=items)
            assert h.headers["x-cycleqd-elite"] == first.headers["x-cycleqd-elite"], (i, step)
        r.router.inflight[first.headers["x-cycleqd-engine"]] -= 100
    assert len(spread) > 1  # different episodes (here: different instructions) still spread over the equals


def test_tool_fields_reach_the_engine_unchanged_in_both_apis(start_router, upstreams):
    r = start_router()
    scripted(upstreams)
    chat = {
        "model": "sql", "tools": CHAT_TOOLS, "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": "run_sql"}},
        "messages": [
            {"role": "system", "content": "Use the tool."}, {"role": "user", "content": SQL},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "run_sql", "arguments": '{"query": "x"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ],
    }  # fmt: skip
    resp = post(r, chat, "/v1/chat/completions")
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "42 rows"
    assert upstreams["querier"].received[-1] == {**chat, "model": "served-querier"}
    responses = {
        "model": "sql", "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": True, "max_output_tokens": 50,
        "input": [
            {"role": "user", "content": SQL},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "run_sql", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "42"},
            {"type": "reasoning", "id": "rs_1", "summary": []},  # an item type the router does not read
        ],
    }  # fmt: skip
    resp = post(r, responses)
    assert resp.status_code == 200 and resp.json()["output"][0]["content"][0]["text"] == "42 rows"
    assert upstreams["querier"].received[-1] == {**responses, "model": "served-querier", "store": False}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
@pytest.mark.parametrize("turn", ["call", "answer"])
def test_streamed_tool_calls_are_relayed_byte_for_byte(start_router, upstreams, path, turn):
    r = start_router()
    scripted(upstreams, ToolScript(SCRIPT.calls, final=SCRIPT.final, pieces=5))
    if path == "/v1/responses":
        convo = [{"role": "user", "content": SQL}]
        if turn == "answer":
            convo += [{"type": "function_call", "call_id": "call_1", "name": "run_sql", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "call_1", "output": "42"}]  # fmt: skip
        body = {"model": "sql", "input": convo, "tools": TOOLS, "stream": True}
    else:
        msgs = [{"role": "user", "content": SQL}]
        if turn == "answer":
            call = {"id": "call_1", "type": "function", "function": {"name": "run_sql", "arguments": "{}"}}
            msgs += [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "42"}]  # fmt: skip
        body = {"model": "sql", "messages": msgs, "tools": CHAT_TOOLS, "stream": True}
    with httpx.stream("POST", f"{r.url}{path}", json=body, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["x-cycleqd-elite"] == "querier"
        assert resp.headers["content-type"].startswith("text/event-stream")
        got = resp.read()
    sent = upstreams["querier"].sent_streams[-1]
    assert got == sent and len(sent) > 500
    datas = [json.loads(e.split("data: ", 1)[1]) for e in sent.decode().split("\n\n") if e and "[DONE]" not in e]
    if path == "/v1/responses":
        deltas = [d["delta"] for d in datas if d["type"].endswith(".delta")]
    else:
        deltas = [tc["function"]["arguments"] for d in datas for tc in d["choices"][0]["delta"].get("tool_calls", [])]
        deltas += [d["choices"][0]["delta"].get("content") or "" for d in datas]
    # the script really streamed the call's arguments (or the answer built from the tool's result) in pieces
    assert "".join(deltas) == (SCRIPT.calls[0].arguments if turn == "call" else "42 rows")
    assert len([d for d in deltas if d]) >= (5 if turn == "call" else 3)


# -- streams that break ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["die_midstream", "die_mid_event"])
def test_a_broken_responses_stream_ends_with_a_terminated_error_event(start_router, upstreams, mode):
    r = start_router()
    upstreams["querier"].mode = mode
    body = {"model": "sql", "input": SQL, "stream": True}
    with httpx.stream("POST", f"{r.url}/v1/responses", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        raw = resp.read()
    assert raw.endswith(b"\n\n") and b"[DONE]" not in raw  # the Responses API sends no [DONE]
    events = [e for e in raw.decode().split("\n\n") if e]
    parsed = []
    for e in events:  # every event whole: an event line and a data line that parses on its own
        kind, data = e.split("\n")
        parsed.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    assert [k for k, _ in parsed] == ["response.created", "response.in_progress", "error"]
    kind, err = parsed[-1]
    assert err["type"] == "error" and err["sequence_number"] == 2 and err["code"] == "upstream_error"
    assert "broke off" in err["message"] and err["error"]["message"] == err["message"]
    seen = []
    with pytest.raises(openai.APIError, match="broke off"):
        for ev in client(r).responses.create(model="sql", input=SQL, stream=True):
            seen.append(ev.type)
    assert seen == ["response.created", "response.in_progress"]


def test_openai_client_reads_a_streamed_scripted_function_call(start_router, upstreams):
    r = start_router()
    scripted(upstreams)
    events = list(client(r).responses.create(model="sql", input=SQL, tools=TOOLS, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    call = events[-1].response.output[0]
    assert (call.type, call.name, call.arguments) == (
        "function_call",
        "run_sql",
        SCRIPT.calls[0].arguments,
    ) and args == call.arguments
