"""Merge-weight search: the fair baseline for CycleQD's best elite.

CycleQD's best elite is chosen among every model the run scored on validation; a plain merge had no search at
all. Here the merges get the same number of validation evaluations, spent by CMA-ES (the ``cma`` package) on
the mean validation score, as mergekit-evolve does (the paper's counterpart is its NSGA-II merge baseline):

- ``task_arithmetic``: one weight per expert, W = W_base + sum_q w_q (W_q - W_base). In genome terms that is
  the genome sum_q w_q * expert_q (see evolve/genome.py, Layout), so each candidate is materialised straight
  into the engine like any CycleQD child. The search starts at the plain average (w_q = 1/K);
- ``ties``: TIES density and scale (evolve/merge.py) on the experts' full weights, starting at the report's
  TIES settings (density 0.2, scale 1).

The start point is the first evaluation, so the result is never worse on validation than the merge it starts
from, and the budget is exact: the last CMA-ES generation is cut short rather than overrun. The winner of each
method is then scored once on test (not counted: CycleQD's reported elite is scored on test the same way).
``cycleqd-evolve merge-search RUN_DIR`` stores the result as ``RUN_DIR/merge_search.json``; evolve/report.py
reads its rows with :func:`report_rows`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evolve.atomic import read_versioned_json, write_json_atomic
from evolve.merge import Ties

FORMAT_VERSION = 1
RESULT_FILE = "merge_search.json"
METHODS = ("task_arithmetic", "ties")
ROW_NAMES = {"task_arithmetic": "task arithmetic (CMA-ES search)", "ties": "TIES (CMA-ES search)"}
#: The report's unsearched TIES settings, the search's start point.
TIES_START = (0.2, 1.0)


class MergeSearchError(RuntimeError):
    """A merge search that cannot run or a result file that cannot be read; the message names the file."""


@dataclass
class SearchResult:
    """The best point CMA-ES found within the budget, with every evaluation it spent."""

    x: list[float]
    score: float
    start_score: float
    evaluations: int
    history: list[tuple[list[float], float]] = field(default_factory=list)


def cma_maximise(
    objective: Callable[[np.ndarray], float],
    x0: Sequence[float],
    *,
    sigma0: float,
    lower: Sequence[float],
    upper: Sequence[float],
    budget: int,
    seed: int,
) -> SearchResult:
    """Maximise ``objective`` with exactly ``budget`` calls: ``x0`` first, then CMA-ES generations (the last
    one evaluated only as far as the budget reaches). Candidates are kept inside [lower, upper]."""
    import cma

    if budget < 1:
        raise MergeSearchError(f"the budget must be at least one evaluation, got {budget}")
    if len(x0) < 2:
        raise MergeSearchError("CMA-ES needs at least two search dimensions")
    lo, hi = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
    start = np.clip(np.asarray(x0, dtype=float), lo, hi)
    start_score = float(objective(start))
    history = [(start.tolist(), start_score)]
    opts = {"seed": seed + 1, "bounds": [lo.tolist(), hi.tolist()], "verbose": -9}  # cma's seed 0: the clock
    es = cma.CMAEvolutionStrategy(start.tolist(), sigma0, opts)
    while len(history) < budget:
        candidates = [np.clip(np.asarray(x, dtype=float), lo, hi) for x in es.ask()]
        take = candidates[: budget - len(history)]
        scores = [float(objective(x)) for x in take]
        history.extend((x.tolist(), s) for x, s in zip(take, scores, strict=True))
        if len(take) == len(candidates):
            es.tell(candidates, [-s for s in scores])  # cma minimises
    best_x, best = max(history, key=lambda h: h[1])  # the first of equal scores: the start point wins ties
    return SearchResult(best_x, best, start_score, len(history), history)


def cycleqd_evaluations(generations: int, children_per_generation: int, n_experts: int) -> int:
    """Validation evaluations a CycleQD run spends: every child, plus the experts scored at set-up (its best
    elite may be an expert)."""
    return generations * children_per_generation + n_experts


#: Called after every validation evaluation with the method, the evaluations it has spent, its budget and its
#: best mean validation score so far (for progress bars and log lines).
OnEvaluation = Callable[[str, int, int, float], None]


def search_run(
    ev: Any,
    budget: int,
    *,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    test: bool = True,
    on_evaluation: OnEvaluation | None = None,
) -> dict[str, Any]:
    """Search merge weights for the population of an :class:`evolve.run.Evolution` (its engine, bases, skills
    and validation items), each method with ``budget`` validation evaluations; returns the result document."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise MergeSearchError(f"unknown merge-search method(s) {sorted(unknown)}: expected {', '.join(METHODS)}")
    layout, skills = ev.bases.layout, list(ev.config.skills)
    k = len(skills)
    experts_g = [layout.expert(q) for q in range(k)]
    out: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "budget": budget,
        "seed": seed,
        "skills": skills,
        "validation_items": ev.config.validation_items,
        "methods": {},
    }

    def with_mean(scores: dict[str, float]) -> dict[str, float]:
        return {**scores, "mean": sum(scores[s] for s in skills) / k}

    def genome_of(w: Sequence[float]) -> torch.Tensor:
        return sum((float(wq) * g for wq, g in zip(w, experts_g, strict=True)), torch.zeros(layout.size))

    spent: dict[str, int] = {}

    def report(method: str, scored: dict[tuple[float, ...], dict[str, float]]) -> None:
        spent[method] = spent.get(method, 0) + 1
        if on_evaluation is not None:
            on_evaluation(method, spent[method], budget, max(v["mean"] for v in scored.values()))

    if "task_arithmetic" in methods:
        scored: dict[tuple[float, ...], dict[str, float]] = {}

        def ta_objective(x: np.ndarray) -> float:
            scores = with_mean(ev.score(genome_of(x), "validation"))
            scored[tuple(x.tolist())] = scores
            report("task_arithmetic", scored)
            return scores["mean"]

        res = cma_maximise(
            ta_objective, [1.0 / k] * k, sigma0=0.15, lower=[0.0] * k, upper=[1.5] * k, budget=budget, seed=seed
        )
        entry = _entry(res, {"weights": dict(zip(skills, res.x, strict=True))}, scored[tuple(res.x)])
        if test:
            entry["test"] = with_mean(ev.score(genome_of(res.x), "test"))
        out["methods"]["task_arithmetic"] = entry

    if "ties" in methods:
        from evolve.evaluators import score_skills

        merge_ties = Ties(ev.bases.base, [ev.bases.materialise(g) for g in experts_g])
        ties_scored: dict[tuple[float, ...], dict[str, float]] = {}

        def score_weights(x: Sequence[float], split: str, n: int) -> dict[str, float]:
            merged = merge_ties(density=float(x[0]), scale=float(x[1]))
            ev.engine.load_state_dict(merged)
            return with_mean(score_skills(ev.engine, ev.skills, split, n, seed=ev.config.seed))

        def ties_objective(x: np.ndarray) -> float:
            scores = score_weights(x, "validation", ev.config.validation_items)
            ties_scored[tuple(x.tolist())] = scores
            report("ties", ties_scored)
            return scores["mean"]

        res = cma_maximise(
            ties_objective, TIES_START, sigma0=0.2, lower=[0.02, 0.0], upper=[1.0, 2.0], budget=budget, seed=seed
        )
        entry = _entry(res, {"density": res.x[0], "scale": res.x[1]}, ties_scored[tuple(res.x)])
        if test:
            entry["test"] = score_weights(res.x, "test", ev.config.test_items)
        out["methods"]["ties"] = entry
    return out


def _entry(res: SearchResult, params: dict[str, Any], validation: dict[str, float]) -> dict[str, Any]:
    return {
        "params": params,
        "validation": validation,
        "start_validation_mean": res.start_score,
        "evaluations": res.evaluations,
        "history": [{"x": x, "mean": s} for x, s in res.history],
    }


def merge_search(
    run_dir: Path,
    budget: int | None = None,
    *,
    seed: int | None = None,
    methods: Sequence[str] = METHODS,
    on_evaluation: OnEvaluation | None = None,
) -> dict[str, Any]:
    """Search merges for a run directory with the run's own validation budget (unless ``budget`` is given) and
    store the result as ``run_dir/merge_search.json`` (atomically)."""
    from evolve.run import Evolution, load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ev = Evolution(run_dir, cfg, resume=True)
    if budget is None:
        budget = cycleqd_evaluations(ev.state.generation, cfg.children_per_generation, len(cfg.skills))
    result = search_run(
        ev, budget, seed=cfg.seed if seed is None else seed, methods=methods, on_evaluation=on_evaluation
    )
    result["cycleqd_generations"] = ev.state.generation
    write_json_atomic(run_dir / RESULT_FILE, result)
    return result


def report_rows(run_dir: Path) -> dict[str, dict[str, float]]:
    """The searched merges' test scores as report rows (empty when the run has no merge_search.json)."""
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        return {}
    data = read_versioned_json(path, FORMAT_VERSION, MergeSearchError, "rerun `cycleqd-evolve merge-search`")
    return {ROW_NAMES[m]: dict(e["test"]) for m, e in data["methods"].items() if "test" in e}
