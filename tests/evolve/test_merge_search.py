"""Merge-weight search (CMA-ES): never worse than its start on validation, and exactly the budget it is given."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from evolve.cli import app
from evolve.merge import get_method
from evolve.merge_search import (
    METHODS,
    RESULT_FILE,
    ROW_NAMES,
    SEARCH_SPACES,
    TIES_START,
    MergeSearchError,
    cma_maximise,
    cycleqd_evaluations,
    report_rows,
    search_run,
)
from tests.evolve.test_merge import _old_ties


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
    from evolve.run import Evolution
    from evolve.rundir import load_run_config

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


class _FakeEvolution:
    """What a search uses of an Evolution, in miniature: three experts, genomes with one coefficient per expert,
    an engine that holds weights, and skills scoring them by closeness to a target each. It records every genome
    scored and every set of weights loaded."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        base = {"w": torch.randn(4, 6, generator=gen), "b": torch.randn(6, generator=gen)}
        self.expert_sds = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
        skills = ["code", "os", "db"]
        self.config = SimpleNamespace(skills=skills, validation_items=5, test_items=7, seed=0)
        layout = SimpleNamespace(size=3, expert=lambda q: torch.eye(3)[q].clone())
        self.bases = SimpleNamespace(layout=layout, base=base, materialise=self.materialise)
        self.loaded: list[dict[str, torch.Tensor]] = []
        self.genomes: list[torch.Tensor] = []
        self.engine = SimpleNamespace(load_state_dict=self.loaded.append)
        targets = [self.expert_sds[0]["w"], 0.5 * (self.expert_sds[1]["w"] + self.expert_sds[2]["w"]), base["w"]]
        self.skills = {s: _Closeness(t, self.loaded) for s, t in zip(skills, targets, strict=True)}

    def materialise(self, g: torch.Tensor) -> dict[str, torch.Tensor]:
        base = self.bases.base
        return {k: b + sum(float(g[q]) * (e[k] - b) for q, e in enumerate(self.expert_sds)) for k, b in base.items()}

    def score(self, genome: torch.Tensor, split: str = "validation") -> dict[str, float]:
        from evolve.evaluators import score_skills

        self.genomes.append(genome)
        self.engine.load_state_dict(self.materialise(genome))
        n = self.config.validation_items if split == "validation" else self.config.test_items
        return score_skills(self.engine, self.skills, split, n, seed=self.config.seed)


class _Closeness:
    def __init__(self, target: torch.Tensor, loaded: list) -> None:
        self.target, self.loaded = target, loaded

    def evaluate(self, engine, split, limit, *, seed):
        return SimpleNamespace(quality=float(1 / (1 + (self.loaded[-1]["w"] - self.target).pow(2).mean())))


def test_each_method_is_searched_through_the_registry_with_the_old_merges():
    ev = _FakeEvolution()
    result = search_run(ev, 7, seed=3, methods=["ties", "task_arithmetic"])
    assert list(result["methods"]) == list(METHODS) == ["task_arithmetic", "ties"]  # the registry's order
    assert ROW_NAMES == {"task_arithmetic": "task arithmetic (CMA-ES search)", "ties": "TIES (CMA-ES search)"}
    assert TIES_START == (0.2, 1.0) and set(SEARCH_SPACES) == set(METHODS)
    ta, ties = result["methods"]["task_arithmetic"], result["methods"]["ties"]
    # task arithmetic: every candidate (7 on validation, the winner on test) scored as the genome sum_q w_q e_q
    experts_g = [torch.eye(3)[q] for q in range(3)]
    want = [sum((float(w) * g for w, g in zip(h["x"], experts_g, strict=True)), torch.zeros(3)) for h in ta["history"]]
    best = [ta["params"]["weights"][s] for s in ev.config.skills]
    want.append(sum((w * g for w, g in zip(best, experts_g, strict=True)), torch.zeros(3)))
    assert len(ev.genomes) == 8 and all(torch.equal(a, b) for a, b in zip(ev.genomes, want, strict=True))
    assert ta["history"][0]["x"] == [1 / 3] * 3 and ta["evaluations"] == 7
    # TIES: every candidate's weights are the old TIES merge of the materialised experts
    experts = [ev.materialise(g) for g in experts_g]
    ties_loaded = ev.loaded[8:]
    assert len(ties_loaded) == 8 and ties["history"][0]["x"] == [0.2, 1.0]
    points = [h["x"] for h in ties["history"]] + [[ties["params"]["density"], ties["params"]["scale"]]]
    for sd, (density, scale) in zip(ties_loaded, points, strict=True):
        old = _old_ties(ev.bases.base, experts, density, scale, presort=True)
        assert all(torch.equal(sd[k], old[k]) for k in old)
    assert set(ties["params"]) == {"density", "scale"} and set(ta["params"]) == {"weights"}
    for entry in (ta, ties):
        assert entry["validation"]["mean"] >= entry["start_validation_mean"]
        assert set(entry["test"]) == {"code", "os", "db", "mean"}
    # the same seed, the same document
    assert json.dumps(search_run(_FakeEvolution(), 7, seed=3), sort_keys=True) == json.dumps(result, sort_keys=True)


def test_only_methods_with_a_search_space_are_searched():
    get_method("dare")  # registered, but not searched
    with pytest.raises(
        MergeSearchError, match=r"unknown merge-search method\(s\) \['dare'\]: expected task_arithmetic, ties"
    ):
        search_run(_FakeEvolution(), 3, methods=["dare"])
