"""Choosing the elites to serve from a run directory's archives.

Rules combine as a union (explicit ids, best per skill, Pareto front, aggregate, top N), each elite once, in the
order the rules name them, and every elite records which rules chose it (``selected_by`` in the manifest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from evolve.rundir import RunError, RunState, aggregate_genome, mean_score
from serve.config import Selection

AGGREGATE_ID = "aggregate"


@dataclass
class Selected:
    id: str
    genome: torch.Tensor
    scores: dict[str, float] | None  # validation scores from the archive; None for the aggregate (scored later)
    test_scores: dict[str, float] | None
    lineage: dict[str, Any]
    selected_by: list[str] = field(default_factory=list)


def pareto_front(scores: dict[str, dict[str, float]]) -> list[str]:
    """Ids whose score vectors no other elite dominates (>= on every skill, > on one)."""

    def dominates(a: dict[str, float], b: dict[str, float]) -> bool:
        return all(a[k] >= b[k] for k in b) and any(a[k] > b[k] for k in b)

    return [i for i in sorted(scores) if not any(dominates(scores[j], scores[i]) for j in scores if j != i)]


def select(state: RunState, rules: Selection) -> list[Selected]:
    """The elites the rules choose; an id the run does not hold is an error naming some that it does."""
    chosen: dict[str, Selected] = {}

    def take(eid: str, reason: str) -> None:
        if eid not in state.genomes:
            known = ", ".join(sorted(state.genomes)[:6])
            raise RunError(
                f"the run has no elite {eid!r} (it holds {len(state.genomes)}, e.g. {known}); "
                "see `cycleqd-serve plan` or the run's state.safetensors"
            )
        if eid not in chosen:
            elite = state.elites[eid]
            chosen[eid] = Selected(eid, state.genomes[eid], elite["validation"], elite.get("test"), elite["lineage"])
        chosen[eid].selected_by.append(reason)

    for eid in rules.ids:
        take(eid, "id")
    if rules.best_per_skill:
        for skill, archive in state.archives.items():
            if archive.stats.best_id is not None:
                take(archive.stats.best_id, f"best:{skill}")
    if rules.pareto:
        for eid in pareto_front({e: state.elites[e]["validation"] for e in state.genomes}):
            take(eid, "pareto")
    if rules.aggregate:
        genome, weights = aggregate_genome(state)
        chosen[AGGREGATE_ID] = Selected(
            AGGREGATE_ID, genome, None, None, {"aggregate_of": weights}, selected_by=["aggregate"]
        )
    if rules.top:
        ranked = sorted(sorted(state.genomes), key=lambda e: -mean_score(state.elites[e]["validation"]))
        for eid in ranked[: rules.top]:
            take(eid, "top")
    if not chosen:
        raise RunError("the selection chose no elite; set select.ids, best_per_skill, pareto, aggregate or top")
    return list(chosen.values())
