"""The operator page: its JSON state from real routed requests, its key, and the page itself in Chromium."""

from __future__ import annotations

import httpx
import openai
import pytest

from router.ui import UIState, reason_kind
from tests.chromium import Elements, dump_dom, needs_chromium, screenshot
from tests.router.conftest import ELITES

CODE = "Write a Python function that returns the sum of the even numbers in a list."
SQL = "How many employees work in the sales department? Answer with one SQL query."


def traffic(url: str, key: str) -> list[str]:
    """One request per reason (classifier, alias, header, pinned), a failover and a refused one; their elites."""
    c = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)

    def chat(text: str, model: str = "auto", **kw) -> str:
        raw = c.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": text}], **kw
        )
        return raw.headers["x-cycleqd-elite"]

    elites = [chat(CODE), chat(CODE, "sql"), chat(CODE, extra_headers={"x-cycleqd-skill-weights": "os=1"})]
    elites.append(chat(SQL, "querier"))
    with pytest.raises(openai.NotFoundError):
        chat(CODE, "no-such-model")
    return elites


def test_reasons_are_counted_by_kind():
    assert [reason_kind(r) for r in ("pinned", "alias:sql", "header", "classifier:session", "")] == [
        "pinned", "alias", "header", "classifier", "refused",
    ]  # fmt: skip
    assert reason_kind("classifier;fallback:1") == "fallback"


def test_per_minute_counts_roll_over_and_keep_empty_minutes():
    now = [600.0]
    ui = UIState(recent=3, minutes=4, clock=lambda: now[0])
    hdr = {"x-cycleqd-elite": "coder", "x-cycleqd-reason": "alias:coder", "x-cycleqd-skill-weights": "code=1.000"}
    ui.record("/v1/chat/completions", 200, hdr, 0.01)
    ui.record("/v1/chat/completions", 502, None, 0.02)
    now[0] += 120  # two minutes later
    for _ in range(3):
        ui.record("/v1/completions", 200, {**hdr, "x-cycleqd-reason": "classifier;fallback:1"}, 0.01)
    pm = ui.per_minute()
    assert pm["minutes"] == [540, 600, 660, 720]
    assert pm["requests"] == [0, 2, 0, 3] and pm["errors"] == [0, 1, 0, 0]
    assert pm["by_elite"] == {"coder": [0, 1, 0, 3]}
    assert pm["by_reason"] == {"alias": [0, 1, 0, 0], "fallback": [0, 0, 0, 3], "refused": [0, 1, 0, 0]}
    assert len(ui.recent) == 3 and ui.recent[-1]["weights"] == {"code": 1.0}


def test_state_reflects_routed_requests_and_needs_the_key(start_router, upstreams, monkeypatch):
    monkeypatch.setenv("TEST_UI_KEYS", "k1")
    r = start_router(api_keys_env="TEST_UI_KEYS")
    assert httpx.get(f"{r.url}/ui").status_code == 401
    assert httpx.get(f"{r.url}/ui/state", params={"key": "wrong"}).status_code == 401
    assert "<script>" in httpx.get(f"{r.url}/ui", params={"key": "k1"}).text
    upstreams["sheller"].mode = "error"  # header os=1 fails over from sheller to the next best
    elites = traffic(r.url, "k1")
    state = httpx.get(f"{r.url}/ui/state", headers={"authorization": "Bearer k1"}).json()

    assert [e["id"] for e in state["elites"]] == list(ELITES)
    assert state["elites"][0]["scores"] == ELITES["coder"]
    assert {e["id"]: e["upstream_errors"] for e in state["engines"]} == {"engine-0": 0, "engine-1": 1, "engine-2": 0}
    kinds = [d["kind"] for d in reversed(state["recent"])]
    assert kinds == ["classifier", "alias", "fallback", "pinned", "refused"]
    assert [d["elite"] for d in reversed(state["recent"])] == [*elites, ""]
    assert state["recent"][0]["status"] == 404 and state["recent"][-1]["weights"]["code"] > 0.5
    pm = state["per_minute"]
    assert sum(pm["requests"]) == 5 and sum(pm["errors"]) == 1
    assert {k: sum(v) for k, v in pm["by_reason"].items()} == {
        "classifier": 1, "alias": 1, "fallback": 1, "pinned": 1, "refused": 1,
    }  # fmt: skip
    errors = state["errors"]
    assert (errors["total"], errors["requests"], errors["rate"]) == (1, 5, 0.2)


@needs_chromium
def test_the_page_renders_live_state_in_chromium(start_router, tmp_path):
    r = start_router()
    traffic(r.url, "none")
    url = f"{r.url}/ui"
    dom = dump_dom(url, tmp_path)
    els = Elements(dom)
    assert 'data-loaded="1"' in dom, dom[-2000:]
    assert [row["data-id"] for row in els.select("tr", "elite-row")] == list(ELITES)  # one row per served elite
    assert len(els.select("tr", "engine-row")) == 3
    assert [row["data-kind"] for row in els.select("tr", "decision-row")] == [
        "refused", "pinned", "header", "alias", "classifier",
    ]  # fmt: skip
    assert {p["data-name"] for p in els.select("polyline", "series")} >= {"coder", "querier", "classifier", "pinned"}
    assert "1 of 5 requests failed" in dom
    screenshot(url, tmp_path / "router-ui.png", size="1280,1100")
