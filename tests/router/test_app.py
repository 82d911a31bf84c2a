"""The gateway with the official openai client against fake upstreams: routing, headers, streaming, faults,
security and limits, reload, metrics."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from router.app import Router
from serve.manifest import Health
from tests.router.conftest import ELITES, write_manifest


def client(r, key="none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{r.url}/v1", api_key=key, max_retries=0, **kw)


def chat(c: openai.OpenAI, text: str, model: str = "auto", **kw):
    return c.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": text}], **kw)


CODE = "Write a Python function that returns the sum of the even numbers in a list."
SHELL = "Show the number of lines in the file notes.txt in the current directory."
SQL = "How many employees work in the sales department? Answer with one SQL query."


def test_classifier_routes_each_skill_to_its_best_elite_with_headers(start_router, upstreams):
    r = start_router()
    c = client(r)
    for text, want, skill in ((CODE, "coder", "code"), (SHELL, "sheller", "os"), (SQL, "querier", "db")):
        raw = chat(
            c,
            text,
            temperature=0.3,
            stop=["\n"],
            n=1,
        )
        assert raw.headers["x-cycleqd-elite"] == want, text
        assert raw.headers["x-cycleqd-reason"] == "classifier"
        weights = dict(kv.split("=") for kv in raw.headers["x-cycleqd-skill-weights"].split(","))
        assert max(weights, key=lambda k: float(weights[k])) == skill
        assert raw.parse().choices[0].message.content == f"answer from {want}"
    # fields the router does not interpret reach the upstream unchanged; only `model` is rewritten
    sent = upstreams["coder"].received[-1]
    assert sent["model"] == "served-coder" and sent["temperature"] == 0.3 and sent["stop"] == ["\n"] and sent["n"] == 1


def test_alias_header_and_pinned_elite_come_before_the_classifier(start_router):
    r = start_router()
    c = client(r)
    raw = chat(c, CODE, model="sql")
    assert (raw.headers["x-cycleqd-elite"], raw.headers["x-cycleqd-reason"]) == ("querier", "alias:sql")
    raw = c.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": CODE}], extra_headers={"x-cycleqd-skill-weights": "os=1"}
    )
    assert (raw.headers["x-cycleqd-elite"], raw.headers["x-cycleqd-reason"]) == ("sheller", "header")
    raw = chat(c, SHELL, model="coder")  # both an elite id and an alias: elite ids are checked first
    assert raw.headers["x-cycleqd-reason"] == "pinned"
    raw = chat(c, SHELL, model="querier")
    assert (raw.headers["x-cycleqd-elite"], raw.headers["x-cycleqd-reason"]) == ("querier", "pinned")
    bad = httpx.post(
        f"{r.url}/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": "x"}]},
        headers={"x-cycleqd-skill-weights": "cooking=1"},
    )
    assert bad.status_code == 400 and "unknown skill 'cooking'" in bad.json()["error"]["message"]


def test_completions_models_health_and_metrics(start_router):
    r = start_router()
    c = client(r)
    out = c.completions.with_raw_response.create(model="shell", prompt="list files", max_tokens=5)
    assert out.headers["x-cycleqd-elite"] == "sheller" and out.parse().choices[0].text == "answer from sheller"
    models = {m.id: m for m in c.models.list().data}
    assert set(ELITES) | {"auto", "coder", "shell", "sql"} <= set(models)
    extra = models["sheller"].model_extra["cycleqd"]
    assert extra["scores"] == ELITES["sheller"] and extra["lineage"] == {"generation": 1} and extra["health"] == "ready"
    assert httpx.get(f"{r.url}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{r.url}/metrics").text
    assert 'cycleqd_router_requests_total{route="/v1/completions",status="200"} 1.0' in metrics
    assert 'cycleqd_router_decisions_total{elite="sheller",reason="alias",skill="os"} 1.0' in metrics
    assert "cycleqd_router_time_to_first_byte_seconds_bucket" in metrics


def test_streaming_passes_chunks_through_sync_and_async(start_router):
    r = start_router()
    stream = client(r).chat.completions.create(model="auto", messages=[{"role": "user", "content": SQL}], stream=True)
    assert [ch.choices[0].delta.content for ch in stream] == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]

    async def run() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key="none", max_retries=0)
        plain = await ac.completions.create(model="coder", prompt="def f(x):")
        s = await ac.completions.create(model="coder", prompt="def f(x):", stream=True)
        texts = [ch.choices[0].text async for ch in s]
        await ac.close()
        return [plain.choices[0].text, *texts]

    assert asyncio.run(run()) == ["answer from coder", "tok0 ", "tok1 ", "tok2 ", "tok3 "]


def test_streaming_is_not_buffered(start_router, upstreams):
    """The first chunk reaches the client while the upstream is still producing the rest."""
    r = start_router()
    upstreams["querier"].pause = 0.5
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{r.url}/v1/completions", json={"model": "sql", "prompt": "q", "stream": True}) as resp:
        chunks = resp.iter_raw()
        first = next(chunks)
        t_first = time.perf_counter() - t0
        rest = b"".join(chunks)
    t_all = time.perf_counter() - t0
    assert b"tok0" in first and b"tok1" not in first and b"[DONE]" in rest
    assert t_first < 0.4 and t_all - t_first > 0.4


def _set_mode(upstreams, **modes):
    for k, v in modes.items():
        upstreams[k].mode = v


def test_5xx_and_closed_connections_fail_over_before_the_first_byte(start_router, upstreams):
    r = start_router()
    c = client(r)
    _set_mode(upstreams, coder="error")
    raw = chat(c, CODE)
    assert raw.headers["x-cycleqd-elite"] != "coder" and "fallback:1" in raw.headers["x-cycleqd-reason"]
    _set_mode(upstreams, coder="close")
    raw = chat(
        c,
        CODE,
    )
    assert raw.headers["x-cycleqd-elite"] != "coder"
    metrics = httpx.get(f"{r.url}/metrics").text
    assert 'cycleqd_router_upstream_errors_total{engine="engine-0",kind="http_500"} 1.0' in metrics
    assert 'kind="RemoteProtocolError"' in metrics
    _set_mode(upstreams, coder="error", sheller="error", querier="error")
    with pytest.raises(openai.APIStatusError) as exc:
        chat(c, CODE)
    assert exc.value.status_code == 502 and exc.value.body["type"] == "upstream_error"
    # a pinned elite is never replaced by another
    _set_mode(upstreams, querier="close", coder="ok")
    with pytest.raises(openai.APIStatusError) as exc:
        chat(c, SQL, model="querier")
    assert exc.value.status_code == 502


def test_circuit_breaker_skips_a_failing_endpoint(start_router, upstreams):
    r = start_router(breaker={"failures": 2, "reset_s": 60})
    c = client(r)
    _set_mode(upstreams, coder="error")
    for _ in range(2):
        chat(c, CODE)
    n = len(upstreams["coder"].received)
    raw = chat(c, CODE)
    assert len(upstreams["coder"].received) == n  # not even tried
    assert raw.headers["x-cycleqd-elite"] != "coder" and "fallback" not in raw.headers["x-cycleqd-reason"]


def test_a_slow_upstream_times_out_with_504_and_nothing_hangs(start_router, upstreams):
    r = start_router(timeouts={"first_byte_s": 0.5, "idle_s": 0.5})
    upstreams["coder"].mode, upstreams["coder"].delay = "slow", 3.0
    t0 = time.perf_counter()
    with pytest.raises(openai.APIStatusError) as exc:
        chat(client(r), CODE, model="coder")
    assert exc.value.status_code == 504 and time.perf_counter() - t0 < 2.5


def test_dying_midstream_ends_with_a_clean_error_event(start_router, upstreams):
    r = start_router()
    upstreams["querier"].mode = "die_midstream"
    got = []
    with pytest.raises(openai.APIError, match="broke off"):
        for ch in client(r).chat.completions.create(
            model="sql", messages=[{"role": "user", "content": SQL}], stream=True
        ):
            got.append(ch.choices[0].delta.content)
    assert got == ["tok0 ", "tok1 "]  # no retry after bytes reached the client
    assert len(upstreams["querier"].received) == 1 and upstreams["coder"].received == []


def test_session_affinity_holds_across_turns_load_and_replicas(start_router, upstreams):
    # equal scores: every elite is within the margin, so load or the session hash decides
    flat = {e: {"code": 0.9, "os": 0.9, "db": 0.9} for e in ELITES}
    r = start_router()
    write_manifest(r.router.policy.manifest, upstreams, scores=flat)
    r.router.refresh_manifest(force=True)
    c = client(r)
    chosen = {chat(c, CODE, extra_headers={"x-session-id": f"s{i}"}).headers["x-cycleqd-elite"] for i in range(12)}
    assert len(chosen) > 1  # sessions spread over the equals
    first = chat(c, CODE, extra_headers={"x-session-id": "episode-7"}).headers["x-cycleqd-elite"]
    r.router.inflight[next(e for e in ("engine-0", "engine-1", "engine-2"))] += 50  # load changes nothing
    for turn in range(3):
        msgs = [
            {"role": "user", "content": CODE},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": f"more {turn}"},
        ]
        raw = c.chat.completions.with_raw_response.create(
            model="auto", messages=msgs, extra_headers={"x-session-id": "episode-7"}
        )
        assert raw.headers["x-cycleqd-elite"] == first and raw.headers["x-cycleqd-reason"].endswith(":session")
    # without a header, the conversation's first messages key the episode
    msgs = [
        {"role": "user", "content": CODE},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "next"},
    ]
    a = c.chat.completions.with_raw_response.create(model="auto", messages=msgs).headers["x-cycleqd-elite"]
    msgs2 = [*msgs, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and then"}]
    assert c.chat.completions.with_raw_response.create(model="auto", messages=msgs2).headers["x-cycleqd-elite"] == a
    # a second replica with no shared state agrees
    r2 = start_router()
    assert chat(client(r2), CODE, extra_headers={"x-session-id": "episode-7"}).headers["x-cycleqd-elite"] == first


def test_unhealthy_engines_are_not_chosen(start_router, upstreams):
    r = start_router()
    write_manifest(r.router.policy.manifest, {"coder": upstreams["coder"]}, health=Health.RESTARTING)
    r.router.refresh_manifest(force=True)
    with pytest.raises(openai.APIStatusError) as exc:
        chat(client(r), CODE)
    assert exc.value.status_code == 503
    assert httpx.get(f"{r.url}/health").status_code == 503


def test_api_keys_rate_limit_body_limit_and_bad_input(start_router, monkeypatch):
    monkeypatch.setenv("TEST_ROUTER_KEYS", "k1,k2")
    r = start_router(api_keys_env="TEST_ROUTER_KEYS", rate_limit_per_minute=5, max_body_bytes=2048)
    with pytest.raises(openai.AuthenticationError):
        chat(client(r, key="wrong"), CODE)
    missing = httpx.post(
        f"{r.url}/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "x"}]}
    )
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    c = client(r, key="k2")
    assert chat(c, CODE, model="coder").headers["x-cycleqd-elite"] == "coder"
    with pytest.raises(openai.NotFoundError) as exc:
        chat(c, CODE, model="gpt-17")
    assert exc.value.body["code"] == "model_not_found"
    h = {"authorization": "Bearer k1", "content-type": "application/json"}
    url = f"{r.url}/v1/chat/completions"
    assert httpx.post(url, content=b"{not json", headers=h).status_code == 400
    wrong = httpx.post(url, json={"model": 3, "messages": "hi"}, headers=h)
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"
    huge = httpx.post(
        url, content=json.dumps({"model": "auto", "messages": [{"role": "user", "content": "x" * 5000}]}), headers=h
    )
    assert huge.status_code == 413 and huge.json()["error"]["type"] == "invalid_request_error"
    statuses = [
        httpx.post(url, json={"model": "coder", "messages": [{"role": "user", "content": "x"}]}, headers=h).status_code
        for _ in range(6)
    ]
    assert 429 in statuses
    assert httpx.get(f"{r.url}/nope").json()["error"]["message"] == "Not Found"


def test_policy_reload_by_admin_endpoint_and_sighup_keeps_in_flight_requests(
    start_router, upstreams, monkeypatch, tmp_path
):
    monkeypatch.setenv("CYCLEQD_ROUTER_ADMIN_KEY", "adm")
    r = start_router(policy_file=True)
    c = client(r)
    upstreams["coder"].mode, upstreams["coder"].delay = "slow", 1.0
    result = {}
    t = threading.Thread(target=lambda: result.update(raw=chat(c, CODE, model="coder")))
    t.start()
    time.sleep(0.2)
    path = r.router.policy_path
    text = path.read_text().replace("manifest:", "aliases: {auto: auto, py: {code: 1.0}}\nmanifest:")
    path.write_text(text)
    assert httpx.post(f"{r.url}/admin/reload").status_code == 401
    ok = httpx.post(f"{r.url}/admin/reload", headers={"authorization": "Bearer adm"})
    assert ok.status_code == 200 and ok.json()["aliases"] == ["auto", "py"]
    t.join(10)
    assert result["raw"].headers["x-cycleqd-elite"] == "coder"  # started under the old policy, finished
    upstreams["coder"].mode = "ok"
    assert chat(c, CODE, model="py").headers["x-cycleqd-reason"] == "alias:py"
    with pytest.raises(openai.NotFoundError):
        chat(c, CODE, model="sql")  # gone with the reload
    path.write_text("margin: -1\n")
    bad = httpx.post(f"{r.url}/admin/reload", headers={"authorization": "Bearer adm"})
    assert bad.status_code == 400 and "field 'margin'" in bad.json()["error"]["message"]
    assert chat(c, CODE, model="py").headers["x-cycleqd-elite"] == "coder"  # the old policy stays


def test_replicas_do_not_share_state_but_router_objects_are_independent(classifier, tmp_path, upstreams):
    from router.policy import RoutingPolicy

    write_manifest(tmp_path / "m.json", upstreams)
    a = Router(RoutingPolicy(manifest=tmp_path / "m.json"), classifier=classifier[:2])
    b = Router(RoutingPolicy(manifest=tmp_path / "m.json"), classifier=classifier[:2])
    a.refresh_manifest(force=True)
    b.refresh_manifest(force=True)
    a.inflight["engine-0"] = 10
    assert b.inflight["engine-0"] == 0 and a.metrics.registry is not b.metrics.registry


def test_keys_from_a_file_and_sighup_reload_of_a_running_router(tmp_path, upstreams, spawn):
    """`cycleqd-router serve` as a user runs it: keys read from a file, SIGHUP re-reads the policy."""
    import signal
    import sys

    import yaml

    from tests.conftest import stop_process
    from tests.router.conftest import free_port

    write_manifest(tmp_path / "manifest.json", upstreams)
    (tmp_path / "keys").write_text("alpha\nbeta\n")
    policy = {
        "manifest": str(tmp_path / "manifest.json"),
        "api_keys_file": str(tmp_path / "keys"),
        "classifier": {"exemplars_per_skill": 20},
        "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    port = free_port()
    proc = spawn(
        [sys.executable, "-m", "router", "serve", "--policy", str(tmp_path / "policy.yaml"), "--port", str(port)]
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600  # a hang guard: the loop ends once it answers
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "router did not start"
            time.sleep(0.3)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="beta", max_retries=0)
        assert chat(c, CODE, model="coder").headers["x-cycleqd-elite"] == "coder"
        with pytest.raises(openai.AuthenticationError):
            chat(openai.OpenAI(base_url=f"{url}/v1", api_key="gamma", max_retries=0), CODE)
        with pytest.raises(openai.NotFoundError):
            chat(c, CODE, model="python")
        (tmp_path / "policy.yaml").write_text(yaml.safe_dump({**policy, "aliases": {"python": {"code": 1.0}}}))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120  # a hang guard: the loop ends once the alias answers
        while True:
            try:
                raw = chat(c, CODE, model="python")
                break
            except openai.NotFoundError:
                assert time.monotonic() < deadline, "SIGHUP did not reload the policy"
                time.sleep(0.2)
        assert raw.headers["x-cycleqd-reason"] == "alias:python" and proc.poll() is None
    finally:
        stop_process(proc, timeout=120)


def test_a_stream_that_stalls_ends_with_an_error_event_after_the_idle_timeout(start_router, upstreams):
    r = start_router(timeouts={"idle_s": 0.5})
    upstreams["querier"].pause = 5.0
    got = []
    t0 = time.perf_counter()
    with pytest.raises(openai.APIError, match="broke off"):
        for ch in client(r).chat.completions.create(
            model="sql", messages=[{"role": "user", "content": SQL}], stream=True
        ):
            got.append(ch.choices[0].delta.content)
    assert got == ["tok0 "] and time.perf_counter() - t0 < 3.0
    assert 'kind="midstream_timeout"' in httpx.get(f"{r.url}/metrics").text


def test_the_last_candidate_is_tried_again_after_a_connection_failure_but_not_after_a_5xx(start_router, upstreams):
    """A pinned elite on one healthy engine (its replica down, as in the chaos test): a connection the engine closed
    without answering is retried on it, up to max_attempts; a 5xx is the engine's answer and is not repeated."""
    r = start_router(breaker={"failures": 10, "reset_s": 60})
    c = client(r)
    _set_mode(upstreams, querier="close")
    with pytest.raises(openai.APIStatusError) as exc:
        chat(c, SQL, model="querier")
    assert exc.value.status_code == 502 and len(upstreams["querier"].received) == 3  # max_attempts
    _set_mode(upstreams, querier="error")
    with pytest.raises(openai.APIStatusError):
        chat(c, SQL, model="querier")
    assert len(upstreams["querier"].received) == 4
