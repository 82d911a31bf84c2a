"""``cycleqd-evolve ablate``: the paper's ablation, rerunning one configuration with one part changed.

Variants: the full method; without cycling (the quality skill stays the first skill); without mutation; with
Gaussian instead of SVD mutation; with uniform instead of elite parent sampling. Each variant is its own run
directory under ``--out`` (resumed if it exists, so an interrupted ablation continues), scored on test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from cycleqd.atomic import write_json_atomic
from evolve.report import score_cycleqd
from evolve.run import Evolution
from evolve.run_config import EvolveConfig
from evolve.rundir import RUN_FILE

VARIANTS: dict[str, dict[str, Any]] = {
    "CycleQD": {},
    "w/o cycle": {"cycle": False},
    "w/o mutation": {"mutation": {"kind": "none"}},
    "Gaussian mutation": {"mutation": {"kind": "gaussian"}},
    "uniform sampling": {"sampling": {"kind": "uniform"}},
}


def variant_config(config: EvolveConfig, change: dict[str, Any]) -> EvolveConfig:
    data = config.model_dump()
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    if change.get("cycle") is False:
        data["fixed_quality"] = data["fixed_quality"] or config.skill_names[0]
    return EvolveConfig.model_validate(data)


def ablate(config: EvolveConfig, out: Path, console: Console) -> dict[str, dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[str, float]]] = {}
    with Progress(console=console) as progress:
        task = progress.add_task("ablation", total=len(VARIANTS) * config.generations)
        for name, change in VARIANTS.items():
            cfg = variant_config(config, change)
            run_dir = out / name.replace("/", "").replace(" ", "-").lower()
            ev = Evolution(run_dir, cfg, resume=(run_dir / RUN_FILE).is_file())
            progress.update(task, description=name, advance=ev.state.generation)
            ev.run(lambda _info: progress.update(task, advance=1))
            rows = score_cycleqd(ev)
            for r in rows.values():
                r["mean"] = sum(r[s] for s in cfg.skills) / len(cfg.skills)
            results[name] = rows
    write_json_atomic(out / "ablation.json", results)
    table = Table(title="Ablation: test accuracy (%) of CycleQD's final models")
    table.add_column("variant")
    for col in ("best elite mean", *(f"best elite {s}" for s in config.skills), "aggregate mean"):
        table.add_column(col, justify="right")
    for name, rows in results.items():
        best, agg = rows["CycleQD best elite"], rows["CycleQD aggregate"]
        table.add_row(
            name,
            f"{100 * best['mean']:.1f}",
            *(f"{100 * best[s]:.1f}" for s in config.skills),
            f"{100 * agg['mean']:.1f}",
        )
    console.print(table)
    return results
