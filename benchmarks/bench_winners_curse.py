"""The winner's curse of the served elites: validation (what selection saw) vs calibration (what the router is
told) vs test (the truth), per skill.

Evolution keeps the elites with the best *validation* scores, so those scores are the best of many noisy draws and
run high; calibration items were never seen by selection, so the calibration score should be an unbiased estimate
of the test score. The served elites are chosen as ``cycleqd-serve`` does (``--config``'s ``select``: by default
each archive's best and the best mean elite) and scored with their exact (full) weights.

    .venv/bin/python benchmarks/bench_winners_curse.py [--run .cache/demo/run] [--config configs/demo-serve.yaml]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from cycleqd.configfile import load_yaml_model
from evolve.engines.hf import TransformersEngine
from evolve.evaluators import build_evaluators, score_skills
from evolve.models.modeling import load_model
from evolve.rundir import load_run
from serve.config import ServeConfig
from serve.select import select


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path(".cache/demo/run"))
    ap.add_argument("--config", type=Path, default=Path("configs/demo-serve.yaml"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_winners_curse.json")
    args = ap.parse_args()
    console = Console(width=140)
    t0 = time.perf_counter()
    run_config, state, bases = load_run(args.run)
    chosen = select(state, load_yaml_model(args.config, ServeConfig).select)
    model, tok = load_model(run_config.models / "base")
    engine = TransformersEngine(model, tok)
    tasks = build_evaluators(run_config.skills)
    skills = list(tasks)
    rows = []
    for sel in chosen:
        if sel.genome is None or sel.scores is None:  # the aggregate is not an archive elite: no selection bias
            continue
        engine.load_genome(bases, sel.genome)
        cal = score_skills(engine, tasks, "calibration", run_config.calibration_items, seed=run_config.seed)
        test = state.elites[sel.id].get("test") or score_skills(
            engine, tasks, "test", run_config.test_items, seed=run_config.seed
        )
        rows.append({"elite": sel.id, "selected_by": sel.selected_by, "validation": sel.scores, "calibration": cal,
                     "test": {s: test[s] for s in skills}})  # fmt: skip
    table = Table(title=f"Served elites of {args.run}: validation / calibration / test (%)")
    table.add_column("elite")
    for s in skills:
        table.add_column(s, justify="right")
    for r in rows:
        cells = [f"{100 * r['validation'][s]:.1f} / {100 * r['calibration'][s]:.1f} / {100 * r['test'][s]:.1f}"
                 for s in skills]  # fmt: skip
        table.add_row(r["elite"] + " (" + ",".join(r["selected_by"]) + ")", *cells)
    console.print(table)

    def gap(a: str, b: str, only_selected: bool = False) -> float:
        vals = [r[a][s] - r[b][s] for r in rows for s in skills
                if not only_selected or f"best:{s}" in r["selected_by"]]  # fmt: skip
        return float(np.mean(vals)) if vals else float("nan")

    summary = {
        "elites": len(rows),
        "validation - test (all skills), points": 100 * gap("validation", "test"),
        "calibration - test (all skills), points": 100 * gap("calibration", "test"),
        "validation - test (each archive's best on its own skill), points": 100 * gap("validation", "test", True),
        "calibration - test (each archive's best on its own skill), points": 100 * gap("calibration", "test", True),
        "items": {"validation": run_config.validation_items, "calibration": run_config.calibration_items,
                  "test": run_config.test_items},
    }  # fmt: skip
    for k, v in summary.items():
        console.print(f"{k}: {v:+.2f}" if isinstance(v, float) else f"{k}: {v}")
    elapsed = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"run": str(args.run), "rows": rows, "summary": summary, "seconds": elapsed}, indent=2)
    )
    console.print(f"elapsed {elapsed:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
