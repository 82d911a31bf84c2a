"""``cycleqd-evolve report``: the paper's results table, on the **test** split, over one or more runs.

Rows: base, each expert, the multi-task baseline (when the population has one), the plain task-arithmetic
average of the experts, TIES and DARE merges, CycleQD's best elite by mean validation score and CycleQD's
aggregate (softmax-weighted merge of each archive's best). With several runs (seeds), each cell is the mean and
the spread (standard deviation).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console
from rich.table import Table

from cycleqd.atomic import write_json_atomic, write_text_atomic
from evolve.evaluators import score_skills
from evolve.merge import get_method
from evolve.merge_search import report_rows
from evolve.models.hf import load_hf
from evolve.run import Evolution
from evolve.rundir import STATE_FILE, load_run_config

REPORT_FILE = "report.json"

#: The plain merges of the experts in the table, by merge-method name (evolve/merge.py), each at its default
#: parameters (a method with a ``seed`` takes the run's) in a row named by the method's label.
REPORT_MERGES = ("average", "ties", "dare")

#: Which elites get test scores stored with them (besides the table's rows): every elite, each archive's best and
#: the best by mean validation score (what a serving selection of ``best_per_skill`` and ``top: 1`` picks, at a
#: fraction of the cost on a big archive), or none.
ElitesOnTest = Literal["all", "best", "none"]


def score_run(run_dir: Path, console: Console, *, elites: ElitesOnTest = "all") -> dict[str, dict[str, float]]:
    """Test scores of every row for one run directory; also written to ``<run>/report.json``.

    The elites that ``elites`` names are scored on test too, and their scores are stored with them in the run
    directory (``elites[id]["test"]`` in state.safetensors, saved atomically), where ``cycleqd-serve`` picks them
    up for the serving manifest.
    """
    ev = Evolution(run_dir, load_run_config(run_dir), resume=True)
    cfg, layout = ev.config, ev.bases.layout
    rows: dict[str, dict[str, float]] = {}

    def weights(sd: dict[str, torch.Tensor]) -> dict[str, float]:
        ev.engine.load_state_dict(sd)
        n = cfg.test_items
        return score_skills(ev.engine, ev.skills, "test", n, seed=cfg.seed)

    with console.status(f"scoring {run_dir} on the test split") as status:
        status.update("base")
        rows["base"] = ev.score(layout.base(), "test")
        for q, s in enumerate(cfg.skills):
            status.update(f"expert:{s}")
            rows[f"expert:{s}"] = ev.score(layout.expert(q), "test")
        multitask = ev.population.multitask
        if multitask is not None and multitask.is_dir():  # a population may come without one
            status.update("multitask")
            mt, _ = load_hf(multitask, dtype=cfg.dtype)
            rows["multitask"] = weights(dict(mt.named_parameters()))
            del mt
        status.update("merges")
        experts_g = [layout.expert(q) for q in range(len(cfg.skills))]
        experts: list[dict[str, torch.Tensor]] | None = None  # full weights, for the merges that need them
        for name in REPORT_MERGES:
            method = get_method(name)
            params = {"seed": cfg.seed} if "seed" in method.Params.model_fields else {}
            if method.linear:  # a merge of genomes, materialised into the engine like any elite
                rows[method.label] = ev.score(method.merge_genomes(experts_g, params), "test")
                continue
            if experts is None:
                experts = [ev.bases.materialise(g) for g in experts_g]
            rows[method.label] = weights(method.merge(ev.bases.base, experts, params))
        rows.update(report_rows(Path(run_dir)))  # the searched merges, when `merge-search` ran on this run
        status.update("CycleQD")
        transcripts: dict[str, Any] = {}
        rows.update(score_cycleqd(ev, transcripts))
        if elites != "none":
            ids = sorted(ev.state.genomes) if elites == "all" else best_elites(ev)
            for n, eid in enumerate(ids, 1):
                status.update(f"elites on test ({elites}): {n}/{len(ids)}")
                known = rows.get(eid) or (rows["CycleQD best elite"] if eid == ev.best_mean_elite() else None)
                ev.state.elites[eid]["test"] = dict(known) if known else ev.score(ev.state.genomes[eid], "test")
            ev.state.save(Path(run_dir) / STATE_FILE)
    for r in rows.values():
        r["mean"] = sum(r[s] for s in cfg.skills) / len(cfg.skills)
    report = {
        "split": "test",
        "test_items": cfg.test_items,
        "generations": ev.state.generation,
        "best_elite": ev.best_mean_elite(),
        "rows": rows,
        "transcripts": transcripts,
    }
    write_json_atomic(Path(run_dir) / REPORT_FILE, report)
    return rows


def best_elites(ev: Evolution) -> list[str]:
    """Each archive's best elite and the best by mean validation score, sorted and without repeats."""
    best = {a.stats.best_id for a in ev.state.archives.values() if a.stats.best_id is not None}
    return sorted(best | {ev.best_mean_elite()})


#: Episode transcripts of the best elite kept in ``report.json`` per skill (the HTML report shows them): this many
#: that passed and this many that failed, in test-split order.
TRANSCRIPTS_PER_OUTCOME = 2


def score_cycleqd(ev: Evolution, transcripts: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """Test scores of CycleQD's two final models: the best elite by mean validation score, the aggregate.

    ``transcripts``, when given, receives a few of the best elite's episode transcripts per episode skill."""
    best_id = ev.best_mean_elite()
    best = ev.state.genomes[best_id]
    rows = {"CycleQD best elite": ev.score(best, "test")}
    if transcripts is not None:
        transcripts.update(sample_transcripts(ev, best_id))
    genome, _ = ev.aggregate_genome()
    rows["CycleQD aggregate"] = ev.score(genome, "test")
    return rows


def sample_transcripts(ev: Evolution, elite: str) -> dict[str, Any]:
    """The last evaluation's transcripts of each episode skill, a few passed and a few failed ones."""
    out: dict[str, Any] = {}
    for name, task in ev.skills.items():
        done = getattr(task, "last_transcripts", None)
        if not done:
            continue
        passed = [t for t in done if t.score >= 1.0][:TRANSCRIPTS_PER_OUTCOME]
        failed = [t for t in done if t.score < 1.0][:TRANSCRIPTS_PER_OUTCOME]
        out[name] = {"elite": elite, "episodes": len(done), "shown": [t.to_json() for t in passed + failed]}
    return out


def combine(runs: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and standard deviation (0 for one run) per row and column, over the rows every run has (a run without
    a merge search has no searched-merge rows, so those rows are left out rather than averaged over fewer runs)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for row in [r for r in runs[0] if all(r in run for run in runs)]:
        out[row] = {}
        for col in runs[0][row]:
            values = [r[row][col] for r in runs]
            out[row][col] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def render(table_data: dict[str, dict[str, tuple[float, float]]], n_runs: int) -> Table:
    cols = list(next(iter(table_data.values())))
    table = Table(title=f"Test accuracy (%), mean ± std over {n_runs} run(s)")
    table.add_column("model")
    for c in cols:
        table.add_column(c, justify="right")
    best_mean = max(v["mean"][0] for v in table_data.values())
    for row, cells in table_data.items():
        texts = [f"{100 * m:.1f} ± {100 * s:.1f}" if n_runs > 1 else f"{100 * m:.1f}" for m, s in cells.values()]
        if cells["mean"][0] == best_mean:
            texts[-1] = f"[bold]{texts[-1]}[/bold]"
        table.add_row(row, *texts)
    return table


def to_markdown(table_data: dict[str, dict[str, tuple[float, float]]], n_runs: int) -> str:
    cols = list(next(iter(table_data.values())))
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for row, cells in table_data.items():
        fmt = [f"{100 * m:.1f} ± {100 * s:.1f}" if n_runs > 1 else f"{100 * m:.1f}" for m, s in cells.values()]
        lines.append(f"| {row} | " + " | ".join(fmt) + " |")
    return "\n".join(lines) + "\n"


def report(
    run_dirs: Sequence[Path], console: Console, out: Path | None = None, *, elites: ElitesOnTest = "all"
) -> dict[str, Any]:
    runs = [score_run(Path(d), console, elites=elites) for d in run_dirs]
    combined = combine(runs)
    console.print(render(combined, len(runs)))
    result = {"runs": [str(d) for d in run_dirs], "rows": combined}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out.with_suffix(".json"), result)
        write_text_atomic(out.with_suffix(".md"), to_markdown(combined, len(runs)))
        console.print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return result
