"""``benchmarks/bench_routing_quality.py`` measures what serving really builds: the manifest is the one
``cycleqd-serve``'s supervisor writes (exemplars, served and calibration scores), the held-out scores are those of
the served weights, and the router ranks by the calibration scores with its own classifier."""

from __future__ import annotations

import dataclasses
import json

import pytest

from benchmarks.bench_routing_quality import route, serve_like, summarise
from router.policy import ClassifierPolicy, RoutingPolicy
from serve.config import Selection, ServeConfig
from serve.manifest import Health, load_manifest
from serve.materialise import EXEMPLARS, Scorer

IDS = ["expert:code", "expert:db"]


@pytest.fixture(scope="module")
def served(mini_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "serve"
    select = Selection(ids=IDS, best_per_skill=False)
    cfg = ServeConfig(run=mini_run, out=out, mode="full", select=select, calibration_items=None)  # the run's: quick
    return serve_like(cfg, per_skill=3, seed=11)


def test_the_manifest_is_the_one_serve_writes_with_exemplars_and_calibration_scores(served, mini_run, tmp_path):
    from serve.service import prepare

    m = load_manifest(served.manifest_path)
    assert served.manifest_path.name == "manifest.json" and [e.id for e in m.elites] == IDS
    assert m.engines and all(e.health == Health.READY for e in m.engines)
    assert m.exemplars is not None and list(m.exemplars) == served.skills
    for ex in m.exemplars.values():
        assert all(len(getattr(ex, split)) == n for split, n in EXEMPLARS.items())
    prep = prepare(ServeConfig(run=mini_run, out=tmp_path, mode="full"))  # the run as serve reads it
    run_config, state, bases = prep.run_config, prep.state, prep.bases
    assert served.calibration_items == run_config.calibration_items
    scorer = Scorer(run_config)
    for e, art in zip(m.elites, served.artifacts, strict=True):
        assert e.calibration_scores == art.calibration_scores and e.routing_scores() == e.calibration_scores
        assert set(e.calibration_scores) == set(served.skills) and e.served_scores is not None
        # the held-out scores are those of the served weights (a full model: the genome's exact weights)
        scorer.engine.load_state_dict(bases.materialise(state.genomes[e.id]))
        for s, task in scorer.tasks.items():
            assert served.scores[e.id][s] == task.evaluate(scorer.engine, "test", 3, seed=11).scores


def test_the_router_classifies_with_the_manifests_exemplars_and_ranks_by_calibration(served, tmp_path):
    policy = RoutingPolicy(cache_dir=tmp_path / "cache", classifier=ClassifierPolicy(exemplars_per_skill=20))
    decisions, report = route(served, policy)
    assert report["skills"] == len(served.skills)  # the classifier learnt every skill from the manifest
    assert len(decisions) == 3 * len(served.skills) and {d.reason for d in decisions} <= {"classifier", "out_of_domain"}
    result = summarise(served, decisions)
    assert result["manifest"]["scores_routed_on"] == "calibration_scores"
    assert result["manifest"]["exemplars"]["code"] == EXEMPLARS
    rows = result["rows"]
    oracle = rows["oracle (best served elite per skill)"]
    for s in [*served.skills, "mean"]:
        singles = [rows[f"single: {e}"][s] for e in IDS]
        assert oracle[s] == pytest.approx(max(singles)) if s != "mean" else oracle[s] >= max(singles) - 1e-9
        assert rows["per-task oracle (upper bound)"][s] >= oracle[s] - 1e-9
        assert rows["random routing (expected)"][s] == pytest.approx(sum(singles) / len(singles))

    # Calibration scores decide: make expert:db's far better on every skill (served scores untouched) and the
    # router sends everything there, by the scores (no tie), whatever the served or archive scores say.
    raw = json.loads(served.manifest_path.read_text())
    for e in raw["elites"]:
        e["calibration_scores"] = {s: (1.0 if e["id"] == "expert:db" else 0.0) for s in served.skills}
    changed = dataclasses.replace(served, manifest_path=tmp_path / "manifest.json")
    changed.manifest_path.write_text(json.dumps(raw))
    decisions, _ = route(changed, policy)
    assert {d.elite for d in decisions} == {d.by_skill for d in decisions} == {"expert:db"}
    assert not any(d.tied for d in decisions)


def test_serving_scores_at_least_the_configured_calibration_items():
    from evolve.run_config import EvolveConfig
    from serve.materialise import calibration_size

    run = EvolveConfig(calibration_items=80)
    assert ServeConfig().calibration_items == 400 and calibration_size(ServeConfig(), run) == 400
    assert calibration_size(ServeConfig(calibration_items=None), run) == 80  # null: the run's
    assert calibration_size(ServeConfig(), EvolveConfig(calibration_items=1000)) == 1000  # a run asking for more
