"""Merge-weight search (CMA-ES): never worse than its start on validation, and exactly the budget it is given."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from evolve.cli import app
from evolve.merge_search import (
    RESULT_FILE,
    MergeSearchError,
    cma_maximise,
    cycleqd_evaluations,
    report_rows,
    search_run,
)


@pytest.mark.parametrize("budget", [1, 2, 7, 8, 23])
def test_budget_is_spent_exactly_and_the_start_is_never_beaten_by_worse(budget):
    calls = []

    def objective(x: np.ndarray) -> float:
        calls.append(x.copy())
        return -float(((x - np.array([0.9, 0.1, 0.4])) ** 2).sum())

    res = cma_maximise(objective, [1 / 3] * 3, sigma0=0.2, lower=[0] * 3, upper=[1.5] * 3, budget=budget, seed=0)
    assert len(calls) == budget == res.evaluations == len(res.history)
    assert np.allclose(calls[0], 1 / 3)  # the start point is evaluated first
    assert res.score >= res.start_score
    assert res.score == max(s for _, s in res.history)
    assert all(((c >= 0) & (c <= 1.5)).all() for c in calls)
    if budget >= 23:  # a few generations find a better point than the start
        assert res.score > res.start_score


def test_search_is_seeded():
    def f(x: np.ndarray) -> float:
        return -float(np.abs(x - 0.7).sum())

    a = cma_maximise(f, [0.2, 0.2], sigma0=0.3, lower=[0, 0], upper=[1, 1], budget=15, seed=3)
    b = cma_maximise(f, [0.2, 0.2], sigma0=0.3, lower=[0, 0], upper=[1, 1], budget=15, seed=3)
    assert a.history == b.history


def test_bad_budget_is_refused():
    with pytest.raises(MergeSearchError, match="at least one evaluation"):
        cma_maximise(lambda x: 0.0, [0.5, 0.5], sigma0=0.1, lower=[0, 0], upper=[1, 1], budget=0, seed=0)


def test_on_a_run_it_equals_or_beats_the_plain_average_within_the_budget(mini_run):
    from evolve.run import Evolution, load_run_config

    ev = Evolution(mini_run, load_run_config(mini_run), resume=True)
    k = len(ev.config.skills)
    average = ev.score(sum(ev.bases.layout.expert(q) for q in range(k)) / k, "validation")
    average_mean = sum(average.values()) / k
    calls = []
    score = ev.score
    ev.score = lambda g, split="validation": calls.append(split) or score(g, split)
    seen, best = [], []
    result = search_run(
        ev, 9, seed=0, methods=["task_arithmetic"],
        on_evaluation=lambda m, done, total, b: (seen.append((m, done, total)), best.append(b)),
    )  # fmt: skip
    ta = result["methods"]["task_arithmetic"]
    assert calls.count("validation") == 9 and calls.count("test") == 1
    assert seen == [("task_arithmetic", i, 9) for i in range(1, 10)]  # progress after every evaluation
    assert all(b <= b2 for b, b2 in itertools.pairwise(best)) and best[-1] == ta["validation"]["mean"]
    assert ta["evaluations"] == 9 and len(ta["history"]) == 9
    assert ta["start_validation_mean"] == pytest.approx(average_mean)
    assert ta["validation"]["mean"] >= average_mean
    # the stored weights reproduce the stored validation score
    w = [ta["params"]["weights"][s] for s in ev.config.skills]
    genome = sum(wq * ev.bases.layout.expert(q) for q, wq in enumerate(w))
    again = score(genome, "validation")
    assert sum(again.values()) / k == pytest.approx(ta["validation"]["mean"])


def test_cli_stores_both_methods_in_the_run(mini_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(mini_run, run)
    out = CliRunner().invoke(app, ["merge-search", str(run), "--budget", "4"])
    assert out.exit_code == 0, out.output
    # not a terminal (a log, CI): plain progress lines instead of a live bar, each method to its end
    assert "4/4 task arithmetic (CMA-ES search) evaluations, best validation mean" in out.output
    assert "4/4 TIES (CMA-ES search) evaluations, best validation mean" in out.output
    data = json.loads((run / RESULT_FILE).read_text())
    assert set(data["methods"]) == {"task_arithmetic", "ties"} and data["budget"] == 4
    for entry in data["methods"].values():
        assert entry["evaluations"] == 4
        assert entry["validation"]["mean"] >= entry["start_validation_mean"]
        assert set(entry["test"]) == {"code", "os", "db", "mean"}
    ties = data["methods"]["ties"]
    assert 0.02 <= ties["params"]["density"] <= 1 and 0 <= ties["params"]["scale"] <= 2
    rows = report_rows(run)
    assert set(rows) == {"task arithmetic (CMA-ES search)", "TIES (CMA-ES search)"}
    # the report's table carries the searched merges beside CycleQD's rows, with the search's test scores
    out = CliRunner().invoke(app, ["report", str(run), "--elites", "none"])
    assert out.exit_code == 0, out.output
    reported = json.loads((run / "report.json").read_text())["rows"]
    for name, scores in rows.items():
        assert reported[name] == pytest.approx(scores)
    assert "CycleQD best elite" in reported and "TIES" in reported


def test_runs_without_a_merge_search_leave_its_rows_out_of_the_combined_table():
    from evolve.report import combine

    a = {"base": {"mean": 0.5}, "TIES (CMA-ES search)": {"mean": 0.9}}
    b = {"base": {"mean": 0.7}}
    out = combine([a, b])
    assert set(out) == {"base"} and out["base"]["mean"][0] == pytest.approx(0.6)


def test_default_budget_is_the_runs_evaluations():
    assert cycleqd_evaluations(6, 2, 3) == 15
    assert cycleqd_evaluations(0, 4, 3) == 3
