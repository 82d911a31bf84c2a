"""What the HTML report shows about a run, as plain data: curves, ancestry and lineage, splits, transcripts.

Pure functions of a run's state (and its ``report.json``) returning numbers, strings, lists and dicts; no HTML
and no drawing: ``evolve.plots`` draws these, ``evolve.html_report`` lays them out as a page.

- curves: coverage, QD score and best quality per archive over generations (pyribs' standard curves), read from
  the state's ``history`` (one record per generation). A run saved before that record existed has no history:
  its curves are *reconstructed* from the surviving elites' generation numbers, a lower bound (a replaced elite
  left no record);
- lineage: the focus elites (each archive's best, the best by mean validation score, any served ids) and all
  their recorded ancestors back to the experts; parents come from the history's record of every child that
  entered an archive, so ancestors that were later replaced still appear;
- splits: the mean of every split the run recorded per elite (calibration appears once runs record it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolve.archive import Elite, SkillArchive
from evolve.rundir import RunState, best_mean_elite, mean_score

SPLIT_ORDER = ("validation", "calibration", "test")
CURVES = (("coverage", "coverage (%)", 1), ("qd_score", "QD score", 2), ("best", "best quality (%)", 3))
"""(metric, label, index in a history record's per-archive values)."""

Curves = dict[str, dict[str, list[tuple[int, float]]]]
"""{metric: {archive: [(generations done, value)]}}."""


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def elite_summary(eid: str, elites: Mapping[str, Any], archive: str | None = None) -> str:
    """An elite's id, scores per split and parents, one fact a line (the hover text of its marks)."""
    info = elites.get(eid, {})
    lines = [eid]
    if archive is not None:
        lines.append(f"archive {archive}")
    for split in SPLIT_ORDER:
        if split in info:
            lines.append(f"{split}: " + ", ".join(f"{k} {pct(v)}" for k, v in info[split].items()))
    lin = info.get("lineage", {})
    if lin.get("parents"):
        lines.append(f"parents: {', '.join(lin['parents'])} (generation {lin.get('generation')})")
    elif "expert" in lin:
        lines.append(f"expert for {lin['expert']}")
    return "\n".join(lines)


# -- elite maps ------------------------------------------------------------------------------------------------
def map_cells(archive: SkillArchive) -> dict[tuple[int, int], Elite]:
    """The elite shown in each (first measure, second measure) cell: with more than two measures, the best over
    the others; with one measure, every cell is in row 0."""
    shown: dict[tuple[int, int], Elite] = {}
    for e in archive.elites():
        key = (e.cell[0], e.cell[1] if len(archive.measures) >= 2 else 0)
        if key not in shown or e.quality > shown[key].quality:
            shown[key] = e
    return dict(sorted(shown.items()))


# -- curves ----------------------------------------------------------------------------------------------------
def curves_from_history(history: Sequence[Mapping[str, Any]]) -> Curves:
    """{metric: {archive: [(generations done, value)]}} from the state's per-generation records."""
    out: Curves = {m: {} for m, _, _ in CURVES}
    for rec in history:
        x = rec["generation"] + 1
        for skill, values in rec["archives"].items():
            for metric, _, index in CURVES:
                if values[index] is not None:
                    out[metric].setdefault(skill, []).append((x, float(values[index])))
    return out


def reconstruct_curves(state: RunState) -> Curves:
    """For a run saved without history: curves of the surviving elites only, by the generation each entered.

    A lower bound on the true curves: an elite that was later replaced in its cell left no record.
    """
    out: Curves = {m: {} for m, _, _ in CURVES}
    for skill, a in state.archives.items():
        born = [(state.elites.get(e.id, {}).get("lineage", {}).get("generation", -1), e.quality) for e in a.elites()]
        cells = a.bins ** len(a.measures)
        for x in range(state.generation + 1):
            qs = [q for g, q in born if g + 1 <= x]
            out["coverage"].setdefault(skill, []).append((x, len(qs) / cells))
            out["qd_score"].setdefault(skill, []).append((x, sum(qs)))
            if qs:
                out["best"].setdefault(skill, []).append((x, max(qs)))
    return out


def run_curves(state: RunState) -> tuple[Curves, bool]:
    """The run's curves and whether they were reconstructed (no history: a lower bound)."""
    if state.history:
        return curves_from_history(state.history), False
    return reconstruct_curves(state), True


# -- lineage ---------------------------------------------------------------------------------------------------
def ancestry(state: RunState) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Parents and generation of every elite that ever entered an archive (as far as the state recorded)."""
    parents: dict[str, list[str]] = {}
    born: dict[str, int] = {}
    for rec in state.history:
        for eid, ps in rec.get("entered", {}).items():
            parents[eid], born[eid] = list(ps), rec["generation"]
    for eid, info in state.elites.items():
        lin = info.get("lineage", {})
        parents.setdefault(eid, list(lin.get("parents", [])))
        born.setdefault(eid, lin.get("generation", -1))
    return parents, born


def id_generation(eid: str) -> int | None:
    m = re.fullmatch(r"g(\d+)c\d+", eid)
    return int(m.group(1)) if m else None


def focus_elites(state: RunState, served: Iterable[str] = ()) -> dict[str, str]:
    """{elite id: label} of the elites whose lineage the page draws: each archive's best, the best mean, served."""
    focus: dict[str, str] = {}
    for s, a in state.archives.items():
        if a.stats.best_id:
            focus.setdefault(a.stats.best_id, f"best {s}")
    focus.setdefault(best_mean_elite(state), "best mean")
    for eid in served:
        if eid in state.elites:
            focus[eid] = f"served {focus.get(eid, '')}".strip()
    return focus


@dataclass(frozen=True)
class LineageNode:
    id: str
    generation: int  # -1: the experts
    role: str  # "focus", "expert" or "ancestor"
    known: bool  # False: no record (the run predates lineage history)
    label: str  # shown next to the node: the focus label or the expert's skill
    summary: str  # the hover text


@dataclass(frozen=True)
class Lineage:
    nodes: list[LineageNode]  # sorted by id
    edges: list[tuple[str, str]]  # (parent, child)


def lineage(state: RunState, focus: Mapping[str, str]) -> Lineage:
    """The focus elites and all their recorded ancestors, with the generation each entered its archive."""
    parents, born = ancestry(state)
    ids: set[str] = set()
    todo = list(focus)
    while todo:
        eid = todo.pop()
        if eid not in ids:
            ids.add(eid)
            todo += parents.get(eid, [])
    nodes = []
    for eid in sorted(ids):
        generation = born[eid] if eid in born else id_generation(eid)
        known = eid in state.elites or eid in born
        if not known:
            summary = f"{eid}\n(no record: the run predates lineage history)"
        elif eid in state.elites:
            summary = elite_summary(eid, state.elites)
        else:
            summary = f"{eid}\n(replaced in its cell later)"
        expert = eid.startswith("expert:")
        role = "focus" if eid in focus else ("expert" if expert else "ancestor")
        label = focus.get(eid, eid.removeprefix("expert:") if expert else "")
        nodes.append(LineageNode(eid, -1 if generation is None else generation, role, known, label, summary))
    edges = [(p, eid) for eid in sorted(ids) for p in parents.get(eid, [])]
    return Lineage(nodes, edges)


# -- splits ----------------------------------------------------------------------------------------------------
def splits_of(elites: Mapping[str, Any]) -> list[str]:
    """The splits any elite was scored on, in the order validation, calibration, test."""
    present = {s for info in elites.values() for s in SPLIT_ORDER if s in info}
    return [s for s in SPLIT_ORDER if s in present]


def split_points(state: RunState, other: str) -> list[tuple[str, float, float]]:
    """(elite id, mean validation score, mean score on ``other``) per elite scored on ``other``, by id."""
    return [
        (eid, mean_score(i["validation"]), mean_score(i[other]))
        for eid, i in sorted(state.elites.items())
        if other in i
    ]


@dataclass(frozen=True)
class SplitRow:
    id: str
    archives: list[str]  # the archives holding the elite
    scores: dict[str, list[float | None]]  # per split: per skill, then the mean (None: not scored)
    summary: str


def split_rows(state: RunState, skills: Sequence[str]) -> list[SplitRow]:
    """One row per live elite, best mean validation score first."""
    splits = splits_of(state.elites)
    holds: dict[str, list[str]] = {}
    for s, a in state.archives.items():
        for e in a.elites():
            holds.setdefault(e.id, []).append(s)
    rows = []
    for eid in sorted(state.elites, key=lambda e: -mean_score(state.elites[e]["validation"])):
        info = state.elites[eid]
        scores: dict[str, list[float | None]] = {}
        for split in splits:
            got = info.get(split)
            scores[split] = [got.get(k) if got else None for k in skills] + [mean_score(got) if got else None]
        rows.append(SplitRow(eid, holds.get(eid, []), scores, elite_summary(eid, state.elites)))
    return rows


# -- transcripts -----------------------------------------------------------------------------------------------
def transcripts(run_dir: Path) -> dict[str, Any]:
    """{skill: {"elite", "episodes", "shown": [episode]}} as ``cycleqd-evolve report`` kept them in report.json;
    empty where there is no report.json, it is unreadable or it kept none."""
    try:
        kept = json.loads((Path(run_dir) / "report.json").read_text()).get("transcripts") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return kept if isinstance(kept, dict) else {}
