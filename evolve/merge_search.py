"""Merge-weight search: the fair baseline for CycleQD's best elite.

CycleQD's best elite is chosen among every model the run scored on validation; a plain merge had no search at
all. Here the merges get the same number of validation evaluations, spent by CMA-ES (the ``cma`` package) on
the mean validation score, as mergekit-evolve does (the paper's counterpart is its NSGA-II merge baseline):

- ``task_arithmetic``: one weight per expert, W = W_base + sum_q w_q (W_q - W_base). In genome terms that is
  the genome sum_q w_q * expert_q (see evolve/genome.py, Layout), so each candidate is materialised straight
  into the engine like any CycleQD child. The search starts at the plain average (w_q = 1/K);
- ``ties``: TIES density and scale on the experts' full weights, starting at the report's TIES settings (the
  method's defaults: density 0.2, scale 1).

Each is a merge method of evolve/merge.py's registry, searched over the :class:`SearchSpace` that
:data:`SEARCH_SPACES` gives it under the same name: a linear method is scored as a merge of genomes, any other
as merged weights (its task vectors taken once per search, :meth:`evolve.merge.MergeMethod.prepare`).

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

from cycleqd.atomic import read_versioned_json, write_json_atomic
from cycleqd.errors import UserError
from evolve.merge import MergeMethod, TiesParams, get_method

FORMAT_VERSION = 1
RESULT_FILE = "merge_search.json"
#: The report's unsearched TIES settings (the method's defaults), the search's start point.
TIES_START = (TiesParams().density, TiesParams().scale)


@dataclass(frozen=True)
class SearchSpace:
    """How CMA-ES searches one merge method: for K experts, its start point, step and bounds; the method's
    parameters at a point (a list parameter has one entry per expert and is stored by skill)."""

    start: Callable[[int], list[float]]
    sigma0: float
    lower: Callable[[int], list[float]]
    upper: Callable[[int], list[float]]
    params: Callable[[Sequence[float]], dict[str, Any]]


#: The searched merge methods by their registry names (evolve/merge.py), in the order they are searched.
SEARCH_SPACES: dict[str, SearchSpace] = {
    "task_arithmetic": SearchSpace(
        start=lambda k: [1.0 / k] * k,  # the plain average
        sigma0=0.15,
        lower=lambda k: [0.0] * k,
        upper=lambda k: [1.5] * k,
        params=lambda x: {"weights": [float(v) for v in x]},
    ),
    "ties": SearchSpace(
        start=lambda k: list(TIES_START),
        sigma0=0.2,
        lower=lambda k: [0.02, 0.0],
        upper=lambda k: [1.0, 2.0],
        params=lambda x: {"density": float(x[0]), "scale": float(x[1])},
    ),
}
METHODS = tuple(SEARCH_SPACES)
ROW_NAMES = {m: f"{get_method(m).label} (CMA-ES search)" for m in METHODS}


class MergeSearchError(UserError, RuntimeError):
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
        raise MergeSearchError(
            f"unknown merge-search method(s) {sorted(unknown)}: expected {', '.join(METHODS)} (the merge methods"
            " with a search space)"
        )
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
    for name in (m for m in METHODS if m in methods):  # the registry's order, whichever order they are asked in
        out["methods"][name] = _search(ev, name, experts_g, budget, seed=seed, test=test, on_evaluation=on_evaluation)
    return out


def _search(
    ev: Any,
    name: str,
    experts_g: Sequence[torch.Tensor],
    budget: int,
    *,
    seed: int,
    test: bool,
    on_evaluation: OnEvaluation | None,
) -> dict[str, Any]:
    """One method's search: its result entry."""
    skills = list(ev.config.skills)
    k = len(skills)
    space = SEARCH_SPACES[name]
    score = _scorer(ev, get_method(name), experts_g)
    scored: dict[tuple[float, ...], dict[str, float]] = {}
    spent = 0

    def with_mean(scores: dict[str, float]) -> dict[str, float]:
        return {**scores, "mean": sum(scores[s] for s in skills) / k}

    def objective(x: np.ndarray) -> float:
        nonlocal spent
        scores = with_mean(score(space.params(x), "validation"))
        scored[tuple(x.tolist())] = scores
        spent += 1
        if on_evaluation is not None:
            on_evaluation(name, spent, budget, max(v["mean"] for v in scored.values()))
        return scores["mean"]

    res = cma_maximise(
        objective,
        space.start(k),
        sigma0=space.sigma0,
        lower=space.lower(k),
        upper=space.upper(k),
        budget=budget,
        seed=seed,
    )
    params = space.params(res.x)
    stored = {p: dict(zip(skills, v, strict=True)) if isinstance(v, list) else v for p, v in params.items()}
    entry = _entry(res, stored, scored[tuple(res.x)])
    if test:
        entry["test"] = with_mean(score(params, "test"))
    return entry


#: Scores of a merge with these parameters on a split, per skill.
Scorer = Callable[[dict[str, Any], str], dict[str, float]]


def _scorer(ev: Any, method: MergeMethod[Any], experts_g: Sequence[torch.Tensor]) -> Scorer:
    """How a search scores ``method``'s merges of the experts: a linear method's as a genome, materialised into
    the engine like any CycleQD child; any other's as weights merged from the experts' task vectors (taken once)."""
    if method.linear:
        return lambda params, split: ev.score(method.merge_genomes(experts_g, params), split)
    from evolve.evaluators import score_skills

    merger = method.prepare(ev.bases.base, [ev.bases.materialise(g) for g in experts_g])

    def score(params: dict[str, Any], split: str) -> dict[str, float]:
        ev.engine.load_state_dict(merger(params))
        n = ev.config.validation_items if split == "validation" else ev.config.test_items
        return score_skills(ev.engine, ev.skills, split, n, seed=ev.config.seed)

    return score


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
    from evolve.run import Evolution
    from evolve.rundir import load_run_config

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
