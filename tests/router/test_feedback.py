"""Outcome feedback: the posterior and its effect on ranking, the ``/v1/feedback`` endpoint (and its refusals),
Thompson exploration, and the SQLite store (a restart, and several processes on one file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from pydantic import ValidationError

from cycleqd.configfile import ConfigError, load_yaml_model
from router.decision import Router
from router.feedback_stores import ALREADY_RATED, Served, SQLiteStore
from router.policy import RoutingPolicy
from router.selection import value
from tests.router.conftest import ELITES, write_manifest

ROOT = Path(__file__).resolve().parents[2]
CODE = {"x-cycleqd-skill-weights": "code=1"}


def chat(r, model: str = "auto", headers: dict | None = None, key: str | None = None) -> httpx.Response:
    """A chat request; model 'auto' is weighted by the header (all code): the test elite 'coder' is also an elite id,
    so model 'coder' would pin it."""
    auth = {"authorization": f"Bearer {key}"} if key else {}
    if model == "auto":
        auth.update(CODE)
    resp = httpx.post(
        f"{r.url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "write a function"}]},
        headers={**auth, **(headers or {})},
    )
    assert resp.status_code == 200, resp.text
    return resp


def rate(r, key: str | None = None, **body) -> httpx.Response:
    auth = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{r.url}/v1/feedback", json=body, headers=auth)


def local_router(tmp_path, **feedback) -> Router:
    """A Router over a manifest of the three test elites (no servers: ``decide`` only)."""
    manifest = tmp_path / "manifest.json"
    if not manifest.exists():
        fake = {eid: SimpleNamespace(url=f"http://127.0.0.1:{9 + i}") for i, eid in enumerate(ELITES)}
        write_manifest(manifest, fake)
    policy = RoutingPolicy.model_validate({"manifest": str(manifest), "feedback": {"enabled": True, **feedback}})
    router = Router(policy)
    router.refresh_manifest(force=True)
    return router


def first(router: Router, headers: dict = CODE) -> str:
    return router.decide({"model": "auto"}, headers, "")[0][0].id


# -- the policy ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("feedback", "message"),
    [
        ({"store": "sqlite"}, "store 'sqlite' needs 'path'"),
        ({"store": "redis"}, "store 'redis' needs 'redis_url'"),
        ({"store": "redis", "redis_url": "http://x:6379"}, "must start with redis://"),
        ({"explore": "ucb"}, "'none' or 'thompson'"),
        ({"prior_strength": 0}, "greater than 0"),
        ({"store": "postgres"}, "'memory', 'sqlite' or 'redis'"),
        ({"enable": True}, "Extra inputs are not permitted"),
    ],
)
def test_the_feedback_policy_is_validated_with_clear_errors(tmp_path, feedback, message):
    with pytest.raises(ValidationError, match=message):
        RoutingPolicy.model_validate({"feedback": feedback})
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps({"feedback": feedback}))  # JSON is YAML
    with pytest.raises(ConfigError, match=r"field 'feedback"):
        load_yaml_model(path, RoutingPolicy)


# -- the posterior ---------------------------------------------------------------------------------------------
def test_with_no_feedback_the_posterior_mean_is_the_score_and_routing_is_unchanged(tmp_path):
    router = local_router(tmp_path)
    m = router.manifest
    for e in m.elites:
        for w in ({"code": 1.0}, {"os": 0.3, "db": 0.7}, {"code": 0.2, "os": 0.4, "db": 0.4}):
            assert router.feedback.worth(e, w) == pytest.approx(value(e, w), abs=1e-12)
    assert [first(router, {"x-cycleqd-skill-weights": f"{k}=1"}) for k in ("code", "os", "db")] == [
        "coder",
        "sheller",
        "querier",
    ]


def test_failures_move_a_skill_away_from_an_elite_after_the_predicted_number(tmp_path):
    """Prior Beta(0.95 * 20, 0.05 * 20); the runner-up on code (querier) is worth 0.70, the margin 0.02: coder's mean
    19 / (20 + n) falls below 0.68 at n = 8 failures, not before."""
    router = local_router(tmp_path, prior_strength=20)
    fb = router.feedback
    for n in range(1, 9):
        assert first(router) == "coder", n
        fb.remember(f"r{n}", None, "coder", {"code": 1.0})
        served = fb.rate(f"r{n}", None, 0.0)
        assert served.elite == "coder"
    assert fb.evidence[("coder", "code")] == (0.0, 8.0)
    assert first(router) == "querier"
    # another skill of the same elite is untouched
    assert first(router, {"x-cycleqd-skill-weights": "os=1"}) == "sheller"
    assert fb.evidence.get(("coder", "os")) is None


def test_mixed_weights_split_an_outcome_between_skills(tmp_path):
    router = local_router(tmp_path)
    fb = router.feedback
    fb.remember("mix", None, "querier", {"code": 0.25, "db": 0.75})
    fb.rate("mix", None, 0.6)
    assert fb.evidence[("querier", "code")] == pytest.approx((0.15, 0.1))
    assert fb.evidence[("querier", "db")] == pytest.approx((0.45, 0.3))
    querier = next(e for e in router.manifest.elites if e.id == "querier")
    assert fb.mean(querier, "db") == pytest.approx((0.96 * 20 + 0.45) / (20 + 0.75))


def test_thompson_explores_the_equals_within_the_margin_and_only_them(tmp_path):
    """On code: coder 0.95, querier 0.70, sheller 0.60. With margin 0.3, coder and querier are equals (sheller is not):
    Thompson draws give querier a share; greedy never does; the draws are reproducible with a seed."""

    def firsts(explore: str, seed: int) -> list[str]:
        router = local_router(tmp_path, explore=explore, seed=seed)
        router.policy = router.policy.model_copy(update={"margin": 0.3})
        return [first(router) for _ in range(300)]

    greedy, drawn = Counter(firsts("none", 1)), Counter(firsts("thompson", 1))
    assert greedy == {"coder": 300}
    assert set(drawn) == {"coder", "querier"} and drawn["coder"] > drawn["querier"] > 0
    assert firsts("thompson", 1) == firsts("thompson", 1)
    # a session keeps its rendezvous elite: an episode is never split by the draws
    router = local_router(tmp_path, explore="thompson", seed=3)
    router.policy = router.policy.model_copy(update={"margin": 0.3})
    assert len({first(router, {**CODE, "x-session-id": "episode-1"}) for _ in range(50)}) == 1


# -- the endpoint ----------------------------------------------------------------------------------------------
def test_feedback_over_http_shifts_routing_and_reports_the_posterior(start_router):
    r = start_router(feedback={"enabled": True, "prior_strength": 4})
    # coder's code prior: Beta(3.8, 0.2); two failures -> mean 3.8 / 6 = 0.633 < querier's 0.70 - margin
    for _ in range(2):
        resp = chat(r)
        assert resp.headers["x-cycleqd-elite"] == "coder"
        ok = rate(r, request_id=resp.headers["x-request-id"], score=0)
        assert ok.status_code == 200, ok.text
        assert ok.json() == {"object": "feedback", "request_id": resp.headers["x-request-id"], "elite": "coder",
                             "weights": {"code": 1.0}, "score": 0.0}  # fmt: skip
    assert chat(r).headers["x-cycleqd-elite"] == "querier"
    stats = httpx.get(f"{r.url}/v1/feedback").json()
    assert stats["enabled"] and stats["store"] == "memory"
    assert stats["elites"]["coder"]["code"] == {"prior": 0.95, "successes": 0.0, "failures": 2.0,
                                                "mean": pytest.approx(3.8 / 6)}  # fmt: skip
    assert stats["elites"]["sheller"]["os"]["mean"] == pytest.approx(0.97)
    metrics = httpx.get(f"{r.url}/metrics").text
    assert 'cycleqd_router_feedback_total{result="accepted"} 2.0' in metrics
    assert 'cycleqd_router_feedback_score_count{elite="coder"} 2.0' in metrics


def test_feedback_by_session_goes_to_the_sessions_latest_request(start_router):
    r = start_router(feedback={"enabled": True})
    chat(r, "sql", {"x-session-id": "ep-7"})
    last = chat(r, "shell", {"x-session-id": "ep-7"})
    ok = rate(r, session_id="ep-7", score=1)
    assert ok.status_code == 200
    assert ok.json()["elite"] == "sheller" and ok.json()["request_id"] == last.headers["x-request-id"]
    again = rate(r, session_id="ep-7", score=1)  # the latest request is rated: a new one must come first
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_rated"
    assert rate(r, session_id="ep-unknown", score=1).json()["error"]["code"] == "unknown_request"


def test_bad_feedback_is_refused_in_openai_format_and_nothing_is_stored(start_router):
    r = start_router(feedback={"enabled": True})
    rid = chat(r).headers["x-request-id"]
    before = httpx.get(f"{r.url}/v1/feedback").json()
    cases = [
        ({"request_id": "no-such-request", "score": 1}, 404, "unknown_request"),
        ({"request_id": rid, "score": 1.5}, 400, "invalid_score"),
        ({"request_id": rid, "score": -0.01}, 400, "invalid_score"),
        ({"request_id": rid, "score": "1"}, 400, "invalid_score"),
        ({"request_id": rid, "score": True}, 400, "invalid_score"),
        ({"request_id": rid}, 400, "invalid_score"),
        ({"score": 1}, 400, "invalid_request"),
        ({"request_id": rid, "session_id": "s", "score": 1}, 400, "invalid_request"),
        ({"request_id": 7, "score": 1}, 400, "invalid_request"),
        ({"request_id": rid, "score": 1, "comment": "great"}, 400, "invalid_request"),
    ]
    for body, status, code in cases:
        resp = rate(r, **body)
        assert resp.status_code == status, (body, resp.text)
        err = resp.json()["error"]
        assert err["code"] == code and err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    for raw in (b"[1, 2]", b"{not json", b'{"request_id": "x", "score": NaN}'):
        resp = httpx.post(f"{r.url}/v1/feedback", content=raw, headers={"content-type": "application/json"})
        assert resp.status_code == 400 and "error" in resp.json(), raw
    assert httpx.get(f"{r.url}/v1/feedback").json() == before  # nothing counted
    metrics = httpx.get(f"{r.url}/metrics").text
    assert 'cycleqd_router_feedback_total{result="invalid_score"} 5.0' in metrics
    assert 'cycleqd_router_feedback_total{result="accepted"}' not in metrics
    # the request was not consumed by the refusals: it can still be rated, once
    assert rate(r, request_id=rid, score=1).status_code == 200
    second = rate(r, request_id=rid, score=0)
    assert second.status_code == 409 and second.json()["error"]["type"] == "conflict_error"
    assert httpx.get(f"{r.url}/v1/feedback").json()["elites"]["coder"]["code"]["successes"] == 1.0


def test_feedback_needs_an_api_key_and_is_off_by_default(start_router, monkeypatch):
    monkeypatch.setenv("TEST_ROUTER_KEYS", "k1")
    r = start_router(api_keys_env="TEST_ROUTER_KEYS")
    rid = chat(r, key="k1").headers["x-request-id"]
    assert rate(r, request_id=rid, score=1).status_code == 401
    assert httpx.get(f"{r.url}/v1/feedback").status_code == 401
    off = rate(r, key="k1", request_id=rid, score=1)
    assert off.status_code == 404 and off.json()["error"]["code"] == "feedback_disabled"
    stats = httpx.get(f"{r.url}/v1/feedback", headers={"authorization": "Bearer k1"}).json()
    assert stats["enabled"] is False and stats["elites"] == {}


# -- SQLite ----------------------------------------------------------------------------------------------------
def test_sqlite_evidence_survives_a_router_restart(start_router, tmp_path):
    db = tmp_path / "feedback.sqlite"
    settings = {"enabled": True, "store": "sqlite", "path": str(db), "prior_strength": 4}
    r = start_router(feedback=settings)
    for _ in range(2):
        rid = chat(r).headers["x-request-id"]
        assert rate(r, request_id=rid, score=0).status_code == 200
    r.__exit__()  # stop it; a new router reads the same file
    r2 = start_router(feedback=settings)
    assert chat(r2).headers["x-request-id"]
    assert httpx.get(f"{r2.url}/v1/feedback").json()["elites"]["coder"]["code"]["failures"] == 2.0
    assert chat(r2).headers["x-cycleqd-elite"] == "querier"
    # a request answered before the restart can still be rated after it (attributions are in the file too)
    assert rate(r2, request_id=rid, score=1).status_code == 409


WORKER = textwrap.dedent("""
    import sys
    from router.feedback_stores import ALREADY_RATED, Served, SQLiteStore
    store = SQLiteStore(sys.argv[1])
    claimed = store.claim("shared", None)
    print("claimed" if isinstance(claimed, Served) else claimed)
    for i in range(int(sys.argv[2])):
        store.add({("coder", "code"): (1.0, 0.5)})
        store.put_served([(Served(f"{sys.argv[3]}-{i}", "coder", {"code": 1.0}), "s")], 60)
""")


def test_sqlite_is_safe_for_several_processes_on_one_file(tmp_path, spawn):
    """Four processes add to the same evidence and race to rate the same request: every increment counts, and the
    request is rated exactly once."""
    db = tmp_path / "shared.sqlite"
    store = SQLiteStore(db)
    store.put_served([(Served("shared", "coder", {"code": 1.0}), None)], 60)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        spawn([sys.executable, "-c", WORKER, str(db), "100", f"p{i}"], env=env, stdout=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    outs = [p.communicate(timeout=600)[0].strip() for p in procs]  # a hang guard
    assert all(p.returncode == 0 for p in procs)
    assert sorted(outs) == sorted(["claimed", ALREADY_RATED, ALREADY_RATED, ALREADY_RATED])
    assert SQLiteStore(db).load() == {("coder", "code"): (400.0, 200.0)}
    assert isinstance(store.claim("p3-99", None), Served)


def test_a_policy_reload_swaps_the_feedback_settings_and_keeps_the_sqlite_evidence(tmp_path):
    db = str(tmp_path / "fb.sqlite")
    router = local_router(tmp_path, store="sqlite", path=db)
    router.feedback.remember("r", None, "coder", {"code": 1.0})
    router.feedback.rate("r", None, 0.0)
    router.policy_path = tmp_path / "policy.yaml"
    base = {"manifest": str(tmp_path / "manifest.json")}
    router.policy_path.write_text(json.dumps({**base, "feedback": {"enabled": True, "store": "sqlite", "path": db,
                                                                   "explore": "thompson"}}))  # fmt: skip
    old = router.feedback
    router.reload_policy()
    assert router.feedback is not old and router.feedback.explores
    assert router.feedback.evidence == {("coder", "code"): (0.0, 1.0)}
    router.policy_path.write_text(json.dumps({**base, "feedback": {"enabled": True, "store": "redis"}}))
    with pytest.raises(ConfigError, match="needs 'redis_url'"):
        router.reload_policy()
    assert router.feedback.explores  # the old settings stay
    router.policy_path.write_text(json.dumps(base))
    router.reload_policy()
    assert not router.feedback.enabled and first(router) == "coder"


# -- several workers, a store that is down ---------------------------------------------------------------------
def test_with_several_workers_the_memory_store_is_the_workers_shared_file(tmp_path, monkeypatch):
    """``store: memory`` in a worker of ``--workers 2`` is the SQLite file in the supervisor's state directory, so two
    workers' Feedback objects see each other's attributions, ratings and evidence; in one process it is a dict."""
    from router.feedback import Feedback, open_store
    from router.feedback_stores import MemoryStore
    from router.policy_sync import COUNT_ENV, FEEDBACK_FILE, STATE_ENV, shared_feedback_file

    policy = RoutingPolicy.model_validate({"feedback": {"enabled": True}}).feedback
    monkeypatch.delenv(STATE_ENV, raising=False)
    assert shared_feedback_file() is None and isinstance(open_store(policy), MemoryStore)
    monkeypatch.setenv(STATE_ENV, str(tmp_path))
    monkeypatch.setenv(COUNT_ENV, "1")
    assert shared_feedback_file() is None
    monkeypatch.setenv(COUNT_ENV, "2")
    assert shared_feedback_file() == tmp_path / FEEDBACK_FILE
    one, two = Feedback(policy), Feedback(policy)  # two workers
    assert isinstance(one.store, SQLiteStore) and one.store.path == tmp_path / FEEDBACK_FILE
    assert one.store.max_entries == policy.max_attributions
    one.remember("r1", "ep", "coder", {"code": 1.0})
    one.sync()  # what keep_in_sync does within milliseconds of the answer
    assert two.rate("r1", None, 0.0).elite == "coder"
    with pytest.raises(Exception, match="already been rated"):
        one.rate(None, "ep", 1.0)
    one.sync()
    assert one.evidence == two.evidence == {("coder", "code"): (0.0, 1.0)}
    assert one.stats(None)["store"] == "memory"
    one.close()
    two.close()


def test_the_shared_sqlite_file_keeps_at_most_max_entries_attributions(tmp_path):
    store = SQLiteStore(tmp_path / "f.sqlite", max_entries=3)
    for i in range(6):
        store._pruned = 0.0  # as if a minute had passed: the pruning runs with this write
        store.put_served([(Served(f"r{i}", "coder", {"code": 1.0}), f"s{i}")], 60 + i)
    assert [store.claim(f"r{i}", None) for i in range(3)] == [None, None, None]  # the oldest went
    assert all(isinstance(store.claim(None, f"s{i}"), Served) for i in range(3, 6))
    assert isinstance(SQLiteStore(tmp_path / "g.sqlite").conn(), object)  # no bound: the TTL alone (as before)


def test_a_feedback_that_overtakes_the_answering_workers_write_waits_for_it_without_holding_a_thread(tmp_path):
    """Worker one answered (its attribution still queued); the feedback reaches worker two first. Two retries on,
    worker one has written it: found, not 404, and the pauses between tries were awaited, not slept in a thread."""
    import asyncio

    from router.feedback import Feedback

    policy = RoutingPolicy.model_validate(
        {"feedback": {"enabled": True, "store": "sqlite", "path": str(tmp_path / "f.sqlite")}}
    ).feedback
    one, two = Feedback(policy), Feedback(policy)
    one.remember("late", None, "coder", {"code": 1.0})
    threads: list[int] = []

    async def main() -> Served:
        async def answering_worker() -> None:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(one.sync, False)

        attempt = two._attempt

        def counted(*args):
            threads.append(1)
            return attempt(*args)

        two._attempt = counted  # type: ignore[method-assign]
        writer = asyncio.create_task(answering_worker())
        served = await two.rate_async("late", None, 1.0)
        await writer
        return served

    assert asyncio.run(main()).elite == "coder"
    assert 2 <= len(threads) <= 5  # a try per pause, not a thread sleeping through them
    with pytest.raises(Exception, match="no answered request") as err:
        asyncio.run(two.rate_async("never", None, 1.0))
    assert err.value.status == 404  # type: ignore[attr-defined]


def test_a_store_that_is_down_is_retried_every_sync_s_not_in_a_busy_loop(tmp_path):
    import asyncio

    from router.feedback import Feedback, keep_in_sync

    policy = RoutingPolicy.model_validate(
        {"feedback": {"enabled": True, "store": "sqlite", "path": str(tmp_path / "f.sqlite"), "sync_s": 0.2}}
    ).feedback
    fb = Feedback(policy)
    calls = []

    def down(items, ttl_s):
        calls.append(1)
        raise ConnectionError("the store is down")

    fb.store.put_served = down  # type: ignore[union-attr,method-assign]
    fb.remember("r", None, "coder", {"code": 1.0})

    async def main() -> None:
        task = asyncio.create_task(keep_in_sync(lambda: fb))
        await asyncio.sleep(1.0)
        task.cancel()

    asyncio.run(main())
    assert 2 <= len(calls) <= 8, len(calls)  # about one try per sync_s
    assert fb.sync_error == "ConnectionError: the store is down" and len(fb.pending) == 1  # kept for later
