"""Agent frameworks, unmodified, against the router: the OpenAI Agents SDK (its Responses model and its Chat
Completions model) runs a tool loop of several turns, and LiteLLM calls the router as an OpenAI-compatible endpoint.
A FakeUpstream plays a scripted tool-calling model, so what the tools receive and return is checked end to end."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from testkit.router_fakes import ToolCall, ToolScript

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network here: litellm's bundled cost map

agents = pytest.importorskip("agents")
agents.set_tracing_disabled(True)

SQL = "How many employees work in the sales department? Answer with one SQL query."
#: Two tool turns, then the answer, which quotes both results (so it can only be right if the tools really ran).
SCRIPT = ToolScript(
    [ToolCall("run_sql", '{"query": "SELECT COUNT(*) FROM staff"}'), ToolCall("run_sql", '{"query": "SELECT 2"}')],
    final="results: {outputs}",
)


def play(upstreams, script: ToolScript = SCRIPT) -> None:
    for u in upstreams.values():
        u.script = script


def run_agent(router_url: str, api: str, stream: bool = False) -> tuple[str, list[str]]:
    """Run an Agent with one function tool through the router; the final output and the queries the tool got."""
    from openai import AsyncOpenAI

    calls: list[str] = []

    @agents.function_tool
    def run_sql(query: str) -> str:
        """Run one SQL query against the company database and return the result."""
        calls.append(query)
        return f"<{len(calls)} rows for {query}>"

    async def main() -> str:
        client = AsyncOpenAI(base_url=f"{router_url}/v1", api_key="agent-key", max_retries=0)
        model_cls = agents.OpenAIResponsesModel if api == "responses" else agents.OpenAIChatCompletionsModel
        agent = agents.Agent(
            name="analyst",
            instructions="You answer questions about the company database; use run_sql.",
            tools=[run_sql],
            model=model_cls(model="auto", openai_client=client),
        )
        try:
            if stream:
                result = agents.Runner.run_streamed(agent, SQL)
                async for _ in result.stream_events():
                    pass
            else:
                result = await agents.Runner.run(agent, SQL)
            return str(result.final_output)
        finally:
            await client.close()

    return asyncio.run(main()), calls


def episode_upstreams(upstreams) -> dict[str, list[dict]]:
    return {name: u.received for name, u in upstreams.items() if u.received}


@pytest.mark.parametrize(
    ("api", "stream", "path"),
    [
        ("responses", False, "/v1/responses"),
        ("responses", True, "/v1/responses"),
        ("chat", False, "/v1/chat/completions"),
        ("chat", True, "/v1/chat/completions"),
    ],
)
def test_openai_agents_sdk_runs_a_tool_loop_on_one_elite(start_router, upstreams, api, stream, path):
    r = start_router()
    play(upstreams)
    final, calls = run_agent(r.url, api, stream)
    # the tool ran with the scripted arguments, turn by turn, and its results reached the model
    assert calls == ["SELECT COUNT(*) FROM staff", "SELECT 2"]
    assert final == "results: <1 rows for SELECT COUNT(*) FROM staff>, <2 rows for SELECT 2>"
    # every turn went to one elite: the classifier's choice for a SQL task, kept by the episode's key
    used = episode_upstreams(upstreams)
    assert list(used) == ["querier"], {k: len(v) for k, v in used.items()}
    turns = used["querier"]
    assert len(turns) == 3 and all(p == path for p in upstreams["querier"].received_paths)
    assert all(t.get("stream", False) is stream for t in turns)
    assert all(t["tools"] and t["model"] == "served-querier" for t in turns)
    if api == "responses":  # the SDK sends the whole conversation each turn (no previous_response_id), stateless
        assert "previous_response_id" not in turns[-1] and turns[-1]["store"] is False
        kinds = [i.get("type", "message") for i in turns[-1]["input"]]
        assert kinds.count("function_call") == 2 and kinds.count("function_call_output") == 2
        assert turns[-1]["instructions"].startswith("You answer questions")
    else:
        roles = [m["role"] for m in turns[-1]["messages"]]
        assert roles == ["system", "user", "assistant", "tool", "assistant", "tool"]


def test_agents_sdk_sees_an_openai_error_for_a_stateful_request(start_router, upstreams):
    """The SDK's server-managed conversation mode sends previous_response_id: the router refuses it clearly."""
    from openai import AsyncOpenAI, BadRequestError

    r = start_router()
    play(upstreams)

    async def main() -> None:
        client = AsyncOpenAI(base_url=f"{r.url}/v1", api_key="k", max_retries=0)
        agent = agents.Agent(name="a", model=agents.OpenAIResponsesModel(model="auto", openai_client=client))
        try:
            await agents.Runner.run(agent, SQL, previous_response_id="resp_earlier")
        finally:
            await client.close()

    with pytest.raises(BadRequestError) as exc:
        asyncio.run(main())
    assert exc.value.body["param"] == "previous_response_id"
    assert "send the full conversation as 'input'" in exc.value.body["message"]


# -- LiteLLM -------------------------------------------------------------------------------------------------------
def test_litellm_completion_through_the_router(start_router, upstreams):
    litellm = pytest.importorskip("litellm")
    r = start_router()
    out = litellm.completion(
        model="openai/sql", api_base=f"{r.url}/v1", api_key="k", messages=[{"role": "user", "content": SQL}]
    )
    assert out.choices[0].message.content == "answer from querier"
    assert upstreams["querier"].received[-1]["model"] == "served-querier"


def test_litellm_tool_calls_and_streamed_tool_deltas_through_the_router(start_router, upstreams):
    litellm = pytest.importorskip("litellm")
    r = start_router()
    play(upstreams, ToolScript(SCRIPT.calls[:1], final="results: {outputs}"))
    tools = [{"type": "function", "function": {"name": "run_sql", "description": "Run one SQL query.",
              "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]  # fmt: skip
    msgs: list[dict] = [{"role": "user", "content": SQL}]
    kw = {"model": "openai/auto", "api_base": f"{r.url}/v1", "api_key": "k", "tools": tools}
    first = litellm.completion(messages=msgs, **kw)
    call = first.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "run_sql",
        {"query": "SELECT COUNT(*) FROM staff"},
    )
    assert first.choices[0].finish_reason == "tool_calls"
    msgs += [first.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "7"}]  # fmt: skip
    final = litellm.completion(messages=msgs, **kw)
    assert final.choices[0].message.content == "results: 7"
    # streamed, the tool call's argument deltas reassemble to the scripted arguments
    chunks = list(litellm.completion(messages=msgs[:1], stream=True, **kw))
    args = "".join(
        tc.function.arguments or "" for ch in chunks for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices
    )
    assert json.loads(args) == {"query": "SELECT COUNT(*) FROM staff"}
    # the tool loop's requests all went to the one elite the classifier chose for this SQL task
    assert list(episode_upstreams(upstreams)) == ["querier"]
    sent = upstreams["querier"].received[1]
    assert sent["tools"] == tools and [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]
