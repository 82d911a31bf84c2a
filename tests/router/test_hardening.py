"""The router defects of issue 11, each pinned by a test: errors always in OpenAI's format, authentication on every
route, sampling parameters checked, session affinity from turn 1, clean stream breaks, request ids, one half-open
trial, a start-up that does not wait for the classifier, and engine keys."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import yaml

from router.decision import Router
from router.policy import RoutingPolicy
from tests.conftest import stop_process
from tests.router.conftest import CLASSIFIER_CACHE, ELITES, RunningRouter, free_port, write_manifest

CODE = "Write a Python function that returns the sum of the even numbers in a list."
SQL = "How many employees work in the sales department? Answer with one SQL query."


def client(r, key="none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{r.url}/v1", api_key=key, max_retries=0, **kw)


def post(r, body, path="/v1/chat/completions", **kw) -> httpx.Response:
    return httpx.post(f"{r.url}{path}", json=body, **kw)


def msgs(text: str = CODE) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


# -- every error is an OpenAI error; an alias the manifest cannot serve is refused ---------------------------------
def test_an_alias_naming_unserved_skills_is_refused_at_start_and_on_reload(tmp_path, upstreams, monkeypatch):
    write_manifest(tmp_path / "manifest.json", upstreams)
    bad = {"manifest": str(tmp_path / "manifest.json"), "aliases": {"chef": {"cooking": 1.0}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    proc = subprocess.run(
        [sys.executable, "-m", "router", "serve", "--policy", str(tmp_path / "bad.yaml"), "--port", str(free_port())],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "alias 'chef'" in proc.stderr and "cooking" in proc.stderr and "code, os, db" in proc.stderr
    # a running router refuses the same alias on reload and keeps its policy
    good = {"manifest": str(tmp_path / "manifest.json"), "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    router = Router(RoutingPolicy.model_validate(good), policy_path=tmp_path / "good.yaml")
    router.refresh_manifest(force=True)
    (tmp_path / "good.yaml").write_text(yaml.safe_dump({**good, "aliases": {"chef": {"code": 1.0, "baking": 1.0}}}))
    from cycleqd.configfile import ConfigError

    with pytest.raises(ConfigError, match=r"alias 'chef'.*baking"):
        router.reload_policy()
    assert "chef" not in router.policy.aliases


def test_unexpected_failures_and_a_changed_manifest_answer_in_openai_json(start_router, upstreams, monkeypatch):
    r = start_router()
    # the manifest is re-published with other skills: the 'coder' alias ({code: 1}) cannot be served any more
    from serve.manifest import EliteEntry, EngineEntry, Health, ServingManifest, save_manifest

    m = ServingManifest(run="fake", skills=["poetry"])
    up = upstreams["coder"]
    m.engines.append(EngineEntry(id="e", url=up.url, device="cpu", mode="full", base_model="x", health=Health.READY))
    m.elites.append(
        EliteEntry(id="poet", engine_id="e", served_model_name="p", endpoint=f"{up.url}/v1", kind="full",
                   scores={"poetry": 0.9})
    )  # fmt: skip
    save_manifest(r.router.policy.manifest, m)
    r.router.refresh_manifest(force=True)
    err = assert_openai_error(post(r, {"model": "shell", "messages": msgs()}), 503)
    assert "alias 'shell'" in err["message"] and "os" in err["message"]
    # an exception nobody expected is still a JSON error, on the proxy routes and on the others
    monkeypatch.setattr(r.router, "decide", lambda *a, **k: 1 / 0)
    err = assert_openai_error(post(r, {"model": "poet", "messages": msgs()}), 500)
    assert err["type"] == "server_error" and "ZeroDivisionError" not in err["message"]
    monkeypatch.setattr(type(r.router), "manifest", property(lambda self: 1 / 0))
    assert_openai_error(httpx.get(f"{r.url}/v1/models"), 500)


# -- authentication on every route ---------------------------------------------------------------------------------
def test_with_api_keys_every_route_but_health_needs_a_key_and_health_shows_no_paths(start_router, monkeypatch):
    monkeypatch.setenv("TEST_ROUTER_KEYS", "k1")
    r = start_router(api_keys_env="TEST_ROUTER_KEYS")
    for path in ("/metrics", "/docs", "/openapi.json", "/v1/models"):
        err = assert_openai_error(httpx.get(f"{r.url}{path}"), 401)
        assert err["code"] == "invalid_api_key"
        assert httpx.get(f"{r.url}{path}", headers={"authorization": "Bearer k1"}).status_code == 200, path
    health = httpx.get(f"{r.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert "manifest" not in health.text and str(r.router.policy.cache_dir) not in health.text
    # metrics are public only when the policy says so
    r2 = start_router(api_keys_env="TEST_ROUTER_KEYS", metrics_public=True)
    assert httpx.get(f"{r2.url}/metrics").status_code == 200
    assert httpx.get(f"{r2.url}/openapi.json").status_code == 401


# -- sampling parameters ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", True), ("max_completion_tokens", 0),
        ("temperature", -0.1), ("temperature", 2.5), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5),
        ("n", 0), ("n", 1000), ("presence_penalty", 3), ("frequency_penalty", -2.5), ("top_k", -2),
        ("min_p", 1.5), ("stop", 5), ("stop", ["a", 3]), ("seed", 0.5), ("logprobs", "yes"), ("top_logprobs", 50),
        ("repetition_penalty", 0), ("stream_options", "x"),
    ],
)  # fmt: skip
def test_bad_sampling_parameters_are_refused_before_routing(start_router, upstreams, field, value):
    r = start_router()
    err = assert_openai_error(post(r, {"model": "coder", "messages": msgs(), field: value}), 400)
    # the param names the field, down to the bad element of a list (``stop[1]``), as for messages and input
    assert err["param"].split("[")[0] == field and field in err["message"]
    assert all(u.received == [] for u in upstreams.values())  # nothing was forwarded


def test_good_sampling_parameters_and_non_finite_numbers(start_router, upstreams):
    r = start_router()
    body = {"model": "coder", "messages": msgs(), "max_tokens": 1, "temperature": 0, "top_p": 1, "n": 2,
            "presence_penalty": -2, "top_k": -1, "stop": ["\n"], "seed": 7, "logprobs": True, "top_logprobs": 3}  # fmt: skip
    assert post(r, body).status_code == 200
    assert upstreams["coder"].received[-1]["max_tokens"] == 1
    assert post(r, {"model": "coder", "prompt": "x", "logprobs": 2, "best_of": 2}, "/v1/completions").status_code == 200
    raw = b'{"model": "coder", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    err = assert_openai_error(httpx.post(f"{r.url}/v1/chat/completions", content=raw), 400)
    assert "NaN" in err["message"]


# -- session affinity from turn 1 ----------------------------------------------------------------------------------
def test_an_episode_stays_on_one_elite_from_turn_1_including_tool_loops(start_router, upstreams):
    flat = {e: {"code": 0.9, "os": 0.9, "db": 0.9} for e in ELITES}  # all equal: only the hash or load decides
    r = start_router()
    write_manifest(r.router.policy.manifest, upstreams, scores=flat)
    r.router.refresh_manifest(force=True)
    c = client(r)
    spread = set()
    for i in range(8):
        system = {"role": "system", "content": f"You are agent {i}."}
        turn = [system, {"role": "user", "content": f"Fix the failing test number {i}."}]
        first = c.chat.completions.with_raw_response.create(model="sql", messages=turn).headers
        spread.add(first["x-cycleqd-elite"])
        # load on the chosen engine must not move later turns
        r.router.inflight[first["x-cycleqd-engine"]] += 100
        call = {"id": f"call{i}", "type": "function", "function": {"name": "run_tests", "arguments": "{}"}}
        for step in range(3):
            turn = [*turn, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": f"call{i}", "content": f"1 failed (step {step})"}]  # fmt: skip
            h = c.chat.completions.with_raw_response.create(model="sql", messages=turn).headers
            assert h["x-cycleqd-elite"] == first["x-cycleqd-elite"], (i, step)
        r.router.inflight[first["x-cycleqd-engine"]] -= 100
    assert len(spread) > 1  # different episodes still spread over the equals


# -- streams that break ---------------------------------------------------------------------------------------------
def test_a_stream_broken_mid_event_ends_cleanly_before_the_error_event(start_router, upstreams):
    r = start_router()
    upstreams["querier"].mode = "die_mid_event"
    body = {"model": "sql", "messages": msgs(SQL), "stream": True}
    with httpx.stream("POST", f"{r.url}/v1/chat/completions", json=body) as resp:
        raw = resp.read()
    events = [e for e in raw.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]  # every event parses on its own
    assert [p["choices"][0]["delta"]["content"] for p in payloads[:-1]] == ["tok0 ", "tok1 "]
    assert "broke off" in payloads[-1]["error"]["message"]
    got = []
    with pytest.raises(openai.APIError, match="broke off"):
        for ch in client(r).chat.completions.create(**body):
            got.append(ch.choices[0].delta.content)
    assert got == ["tok0 ", "tok1 "]


# -- request ids and trace context ----------------------------------------------------------------------------------
def test_request_id_and_traceparent_reach_the_engine_and_the_id_comes_back(start_router, upstreams, monkeypatch):
    monkeypatch.setenv("TEST_ROUTER_KEYS", "k1")
    r = start_router(api_keys_env="TEST_ROUTER_KEYS")
    auth = {"authorization": "Bearer k1"}
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    resp = post(
        r, {"model": "coder", "messages": msgs()}, headers={**auth, "x-request-id": "req-42", "traceparent": tp}
    )
    assert resp.headers["x-request-id"] == "req-42"
    sent = upstreams["coder"].received_headers[-1]
    assert sent["x-request-id"] == "req-42" and sent["traceparent"] == tp
    assert "k1" not in json.dumps(sent)  # the client's key is not the engine's
    resp = post(r, {"model": "coder", "messages": msgs()}, headers=auth)
    rid = resp.headers["x-request-id"]
    assert len(rid) >= 16 and upstreams["coder"].received_headers[-1]["x-request-id"] == rid
    assert "traceparent" not in upstreams["coder"].received_headers[-1]
    other = post(r, {"model": "coder", "messages": msgs()}, headers=auth).headers["x-request-id"]
    assert other != rid
    # errors carry it too, and a malformed id is replaced
    assert httpx.get(f"{r.url}/v1/models", headers={"x-request-id": "e-1"}).headers["x-request-id"] == "e-1"
    bad = post(r, {"model": "coder", "messages": msgs()}, headers={**auth, "x-request-id": "a b" * 100})
    assert bad.status_code == 200 and bad.headers["x-request-id"] != "a b"


# -- circuit breaker ------------------------------------------------------------------------------------------------
def test_a_half_open_breaker_lets_exactly_one_trial_through(start_router, upstreams):
    r = start_router(breaker={"failures": 1, "reset_s": 0.3})
    c = client(r, default_headers={"x-cycleqd-skill-weights": "code=1"})  # coder first, the others as fallbacks
    upstreams["coder"].mode = "error"
    assert c.chat.completions.with_raw_response.create(model="auto", messages=msgs()).headers[
        "x-cycleqd-elite"
    ] != "coder"  # fmt: skip
    n = len(upstreams["coder"].received)
    upstreams["coder"].mode, upstreams["coder"].delay = "slow", 1.0  # the trial takes a while
    time.sleep(0.4)
    elites: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        h = c.chat.completions.with_raw_response.create(model="auto", messages=msgs()).headers
        with lock:
            elites.append(h["x-cycleqd-elite"])

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join(10)
    assert len(upstreams["coder"].received) - n == 1  # one trial, not six
    assert elites.count("coder") == 1 and len(elites) == 6
    # the trial succeeded: the circuit is closed again
    upstreams["coder"].mode = "ok"
    assert c.chat.completions.with_raw_response.create(model="auto", messages=msgs()).headers[
        "x-cycleqd-elite"
    ] == "coder"  # fmt: skip


# -- start-up with an empty cache ------------------------------------------------------------------------------------
class SlowClassifierRouter(Router):
    """Holds the classifier build until the test releases it, so that 'not ready yet' is a state, not a race."""

    release = threading.Event()

    def build_classifier(self) -> None:
        assert self.release.wait(60)
        super().build_classifier()


def test_the_router_serves_before_the_classifier_is_built(tmp_path, upstreams, classifier):
    write_manifest(tmp_path / "manifest.json", upstreams)
    # the build waits for the test's signal (as a cold cache makes it wait for the embeddings), then finds the
    # embeddings the session's classifier cached
    pol = RoutingPolicy(
        manifest=str(tmp_path / "manifest.json"), cache_dir=CLASSIFIER_CACHE, classifier={"exemplars_per_skill": 60}
    )
    router = SlowClassifierRouter(pol)
    router.release.clear()
    with RunningRouter(router) as r:
        assert httpx.get(f"{r.url}/v1/models").status_code == 200
        c = client(r)
        for model in ("querier", "sql"):  # pinned, alias
            raw = c.chat.completions.with_raw_response.create(model=model, messages=msgs())
            assert raw.headers["x-cycleqd-elite"] == "querier"
        raw = c.chat.completions.with_raw_response.create(
            model="auto", messages=msgs(), extra_headers={"x-cycleqd-skill-weights": "os=1"}
        )
        assert raw.headers["x-cycleqd-elite"] == "sheller"
        t0 = time.perf_counter()
        resp = post(r, {"model": "auto", "messages": msgs()})
        err = assert_openai_error(resp, 503)
        assert err["code"] == "classifier_starting" and int(resp.headers["retry-after"]) >= 1
        assert time.perf_counter() - t0 < 30
        router.classifier = (classifier[0], None)  # hand the build the encoder of the session (no reload of it)
        router.release.set()
        deadline = time.monotonic() + 120
        while (resp := post(r, {"model": "auto", "messages": msgs()})).status_code == 503:
            assert time.monotonic() < deadline, resp.text
            time.sleep(0.2)
        assert resp.headers["x-cycleqd-elite"] == "coder" and resp.headers["x-cycleqd-reason"] == "classifier"


def test_the_cli_announces_the_url_only_once_the_server_answers(tmp_path, upstreams, spawn):
    write_manifest(tmp_path / "manifest.json", upstreams)
    pol = {
        "manifest": str(tmp_path / "manifest.json"),
        "cache_dir": str(tmp_path / "cold"),
        "classifier": {"exemplars_per_skill": 20},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pol))
    port = free_port()
    proc = spawn(
        [sys.executable, "-m", "router", "serve", "--policy", str(tmp_path / "p.yaml"), "--port", str(port)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert f"http://127.0.0.1:{port}/v1" in line
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models")  # no retry: it must answer now
        assert models.status_code == 200 and "coder" in models.text
    finally:
        stop_process(proc, timeout=120)


# -- engine keys --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["env", "file"])
def test_the_router_presents_the_engine_key(tmp_path, upstreams, classifier, monkeypatch, how):
    monkeypatch.delenv("CYCLEQD_ENGINE_KEY", raising=False)
    monkeypatch.delenv("CYCLEQD_ENGINE_KEY_FILE", raising=False)
    if how == "env":
        monkeypatch.setenv("CYCLEQD_ENGINE_KEY", "engine-secret")
    else:
        (tmp_path / "engine.key").write_text("engine-secret\n")
        monkeypatch.setenv("CYCLEQD_ENGINE_KEY_FILE", str(tmp_path / "engine.key"))
    for u in upstreams.values():
        u.api_key = "engine-secret"
    write_manifest(tmp_path / "manifest.json", upstreams)
    pol = RoutingPolicy(manifest=str(tmp_path / "manifest.json"), cache_dir=tmp_path / "cache")
    with RunningRouter(Router(pol, classifier=classifier[:2])) as r:
        raw = client(r).chat.completions.with_raw_response.create(model="coder", messages=msgs())
        assert raw.parse().choices[0].message.content == "answer from coder"
        assert upstreams["coder"].received_headers[-1]["authorization"] == "Bearer engine-secret"
        upstreams["coder"].api_key = "rotated"  # an engine that refuses the router's key is a server fault
        err = assert_openai_error(post(r, {"model": "coder", "messages": msgs()}), 502)
        assert "CYCLEQD_ENGINE_KEY" in err["message"]


def test_breaker_states_one_trial_that_expires_if_never_reported():
    from router.selection import Breaker

    b = Breaker(failures=2, reset_s=10.0)
    b.record(False)
    assert b.acquire(now=0.0)  # one failure: still closed
    b.record(False)
    opened = b.opened_at
    assert opened is not None and not b.allows(opened + 5) and not b.acquire(opened + 5)
    assert b.allows(opened + 10) and b.acquire(opened + 10)  # half-open: the trial
    assert not b.allows(opened + 11) and not b.acquire(opened + 11)  # only one
    assert b.acquire(opened + 20.5)  # the first trial never reported back: another one, not a lock-out
    b.record(True)
    assert b.opened_at is None and b.acquire(opened + 21) and b.acquire(opened + 21)
