"""Served elites carry calibration scores (a split selection never saw), the router weighs them, and the manifest
carries each skill's exemplar prompts from the run's evaluators."""

from __future__ import annotations

from evolve.evaluators import SKILL_NAMES
from serve.manifest import EliteEntry


def _entry(**kw) -> EliteEntry:
    return EliteEntry(id="e", engine_id="x", served_model_name="e", endpoint="http://127.0.0.1:1/v1", kind="full", **kw)


def test_routing_scores_prefer_calibration_then_served_then_archive():
    archive, served, cal = {"code": 0.9}, {"code": 0.85}, {"code": 0.8}
    assert _entry(scores=archive).routing_scores() == archive
    assert _entry(scores=archive, served_scores=served).routing_scores() == served
    assert _entry(scores=archive, served_scores=served, calibration_scores=cal).routing_scores() == cal


def test_materialise_scores_served_weights_on_calibration_and_exemplars_come_from_the_run(tmp_path, mini_run):
    from evolve.rundir import load_run
    from serve.config import Selection, ServeConfig
    from serve.materialise import EXEMPLARS, Scorer, materialise, skill_exemplars
    from serve.select import select

    run_config, state, bases = load_run(mini_run)
    cfg = ServeConfig(run=mini_run, out=tmp_path / "serve", mode="full", measure_truncation=False)
    chosen = select(state, Selection(ids=["expert:code", "expert:db"], best_per_skill=False))
    scorer = Scorer(run_config)
    arts = materialise(cfg, run_config, bases, chosen, scorer=scorer)
    for art in arts:
        assert art.calibration_scores is not None and set(art.calibration_scores) == set(SKILL_NAMES)
        # exactly the calibration split's score of those weights, not the validation one
        again = scorer(bases.materialise(state.genomes[art.selected.id]), "calibration")
        assert art.calibration_scores == again
    ex = skill_exemplars(run_config)
    assert list(ex) == list(SKILL_NAMES)
    for split, n in EXEMPLARS.items():
        assert all(len(getattr(e, split)) == n for e in ex.values())
    # held-out prompts the classifier is tested on are not among those it learns from
    assert not set(ex["code"].train) & set(ex["code"].test)
