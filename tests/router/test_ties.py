"""When the scores cannot separate the best elites (within the routing margin) the router says so: ``Ranked.tied``,
the ``x-cycleqd-tie`` response header and the ``/ui`` record; a clear winner carries no tie."""

from __future__ import annotations

import httpx
import openai

from router.policy import RoutingPolicy
from router.selection import rank
from router.ui import UIState
from serve.manifest import EliteEntry
from tests.router.conftest import ELITES


def elite(eid: str, engine: str = "e0", **scores: float) -> EliteEntry:
    return EliteEntry(id=eid, engine_id=engine, served_model_name=eid, endpoint="http://x/v1", kind="lora",
                      scores={"os": 0.5}, calibration_scores=scores)  # fmt: skip


def ranked(elites: list[EliteEntry], weights: dict[str, float], margin: float, session: str | None = None):
    return rank(elites, weights, healthy=lambda e: True, load=lambda e: 0, margin=margin, session=session)


def test_elites_within_the_margin_are_a_tie_named_chosen_first():
    # the demo's os case: three calibration scores 0.600 / 0.613 / 0.625 inside a margin of 0.02 ... 0.03
    es = [elite("a", os=0.600), elite("b", os=0.613), elite("c", os=0.625)]
    r = ranked(es, {"os": 1.0}, margin=0.03)
    assert set(r.tied) == {"a", "b", "c"} and r.tied[0] == r[0].id
    r = ranked(es, {"os": 1.0}, margin=0.02)
    assert set(r.tied) == {"b", "c"} and r[0].id == "c"  # no load: the better of the equals
    for key in ("s1", "s2", "s3", "s4"):  # a session's rendezvous pick is first, and still a tie
        r = ranked(es, {"os": 1.0}, margin=0.02, session=key)
        assert r.tied[0] == r[0].id and set(r.tied) == {"b", "c"}


def test_a_clear_winner_is_no_tie_nor_is_one_elite_on_two_engines():
    es = [elite("a", os=0.60), elite("b", os=0.70)]
    r = ranked(es, {"os": 1.0}, margin=0.02)
    assert r.tied == () and [e.id for e in r] == ["b", "a"]
    twice = [elite("b", "e0", os=0.70), elite("b", "e1", os=0.70), elite("a", os=0.5)]
    assert ranked(twice, {"os": 1.0}, margin=0.02).tied == ()
    assert ranked([], {"os": 1.0}, margin=0.02).tied == ()
    # margin 0: only exact equals tie
    assert ranked([elite("a", os=0.7), elite("b", os=0.7)], {"os": 1.0}, margin=0.0).tied == ("a", "b")


def test_the_decision_header_and_the_ui_record_name_the_tie(start_router):
    r = start_router(margin=0.02)
    c = openai.OpenAI(base_url=f"{r.url}/v1", api_key="none", max_retries=0)

    def ask(weights: str):
        return c.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-cycleqd-skill-weights": weights},
        ).headers  # fmt: skip

    # code=0.5,os=0.5: coder 0.775, sheller 0.785 (within the margin 0.02), querier 0.65
    assert abs(0.5 * sum(ELITES["sheller"][k] - ELITES["coder"][k] for k in ("code", "os")) - 0.01) < 1e-9
    h = ask("code=0.5,os=0.5")
    assert set(h["x-cycleqd-tie"].split(",")) == {"coder", "sheller"}
    assert h["x-cycleqd-tie"].split(",")[0] == h["x-cycleqd-elite"]
    assert "x-cycleqd-tie" not in ask("db=1")  # querier 0.96 against 0.7: a clear winner
    state = httpx.get(f"{r.url}/ui/state").json()
    assert [set(d["tie"]) for d in state["recent"]] == [set(), {"coder", "sheller"}]  # newest first
    assert state["ties"] == {"total": 1, "rate": 0.5, "margin": 0.02}
    # the default margin (0.005) tells the two apart: 0.785 against 0.775 is no tie
    r.router.policy = r.router.policy.model_copy(update={"margin": RoutingPolicy().margin})
    h = ask("code=0.5,os=0.5")
    assert "x-cycleqd-tie" not in h and h["x-cycleqd-elite"] == "sheller"


def test_ui_state_counts_ties_from_the_header():
    ui = UIState()
    hdr = {"x-cycleqd-elite": "a", "x-cycleqd-reason": "classifier:session", "x-cycleqd-skill-weights": "os=1.000"}
    ui.record("/v1/chat/completions", 200, {**hdr, "x-cycleqd-tie": "a,b"}, 0.01)
    ui.record("/v1/chat/completions", 200, hdr, 0.01)
    assert [d["tie"] for d in ui.recent] == [["a", "b"], []]
    assert ui.totals["ties"] == 1 and ui.recent[0]["kind"] == "classifier"
