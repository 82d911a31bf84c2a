"""CycleQD costs on the embedded default, in one run:

1. time per generation split into sampling / crossover / mutation / materialisation / evaluation / saving;
2. materialisation throughput (genome -> weights written in place into the engine) against a plain copy of
   the same weights into the same tensors (the floor any weight swap pays), as a ratio;
3. bytes on disk per elite (its genome in the run's state file) against a full copy of the model's weights;
4. the same generations with children scored by 2 pool workers and by 2 Ray actors (1 torch thread each)
   against the local executor: wall time per generation as a ratio, and whether the archive is the same.

Needs the demo's bootstrap models (`make demo`, or `cycleqd-evolve bootstrap`). Prints a table and writes
benchmarks/results/bench_evolve.json.

    .venv/bin/python benchmarks/bench_evolve.py [--models .cache/demo/models] [--generations 6]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from evolve.run import Evolution
from evolve.run_config import EvolveConfig
from evolve.rundir import STATE_FILE, archive_ids, genomes_equal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path(".cache/demo/models"))
    ap.add_argument("--generations", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=50, help="materialisations timed for the throughput ratio")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_evolve.json")
    args = ap.parse_args()
    console = Console()
    if not (args.models / "base").is_dir():
        raise SystemExit(f"{args.models}/base: missing; run `make demo` or `cycleqd-evolve bootstrap` first")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = EvolveConfig(models=args.models, generations=args.generations)
        ev = Evolution(Path(tmp) / "run", cfg)
        ev.timings.clear()  # set-up (SVD, scoring the experts) is not a generation
        t0 = time.perf_counter()
        ev.run()
        wall = time.perf_counter() - t0
        per_gen = {k: v / args.generations for k, v in ev.timings.items()}
        per_gen["total (wall)"] = wall / args.generations

        params = ev.engine.state_dict()
        genome = ev.state.genomes[ev.best_mean_elite()]
        full = {k: v.clone() for k, v in params.items()}
        for _ in range(3):
            ev.bases.materialise_into(genome, params)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            ev.bases.materialise_into(genome, params)
        mat = (time.perf_counter() - t0) / args.repeats
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            for k, p in params.items():
                p.copy_(full[k])
        copy = (time.perf_counter() - t0) / args.repeats

        genome_bytes = ev.bases.layout.size * 4
        state_bytes = (Path(tmp) / "run" / STATE_FILE).stat().st_size
        n_genomes = len(ev.state.genomes)
        model_bytes = (args.models / "base" / "model.safetensors").stat().st_size

        executors = {"local": per_gen["total (wall)"]}
        same = {}
        for kind in ("pool", "ray"):
            other = Evolution(Path(tmp) / kind, cfg.model_copy(update={"executor": kind, "workers": args.workers}))
            ex = other.executor()
            ex.score_many([other.state.genomes[f"expert:{s}"] for s in cfg.skills][: args.workers] * 2)  # start-up
            t0 = time.perf_counter()
            other.run()
            executors[f"{kind} x{args.workers}"] = (time.perf_counter() - t0) / args.generations
            same[kind] = archive_ids(other.state) == archive_ids(ev.state) and genomes_equal(other.state, ev.state)

    title = f"CycleQD per generation ({cfg.children_per_generation} children, {cfg.validation_items} items/skill)"
    table = Table(title=title)
    table.add_column("phase")
    table.add_column("seconds / generation", justify="right")
    table.add_column("share", justify="right")
    for k, v in per_gen.items():
        table.add_row(k, f"{v:.3f}", f"{100 * v / per_gen['total (wall)']:.1f}%" if k != "total (wall)" else "")
    console.print(table)
    t2 = Table(title="materialisation and storage")
    t2.add_column("measure")
    t2.add_column("value", justify="right")
    t2.add_row("materialise genome in place (ms)", f"{1000 * mat:.2f}")
    t2.add_row("plain copy of the same weights (ms)", f"{1000 * copy:.2f}")
    t2.add_row("materialise / copy", f"{mat / copy:.1f}x")
    t2.add_row("genome bytes per elite", f"{genome_bytes:,}")
    t2.add_row("state file bytes per kept genome", f"{state_bytes / n_genomes:,.0f}")
    t2.add_row("full model weights bytes", f"{model_bytes:,}")
    t2.add_row("full copy / genome", f"{model_bytes / genome_bytes:.1f}x")
    console.print(t2)
    t3 = Table(title="where children are scored (wall seconds per generation)")
    for c in ("executor", "s / generation", "speed-up vs local", "same archive as local"):
        t3.add_column(c, justify="right")
    for k, v in executors.items():
        t3.add_row(k, f"{v:.3f}", f"{executors['local'] / v:.2f}x", "" if k == "local" else str(same[k.split()[0]]))
    console.print(t3)
    result = {
        "benchmark": "evolve",
        "machine": {"threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "generations": args.generations,
        "children_per_generation": cfg.children_per_generation,
        "validation_items": cfg.validation_items,
        "seconds_per_generation": per_gen,
        "materialise_ms": 1000 * mat,
        "plain_copy_ms": 1000 * copy,
        "materialise_over_copy": mat / copy,
        "genome_bytes": genome_bytes,
        "state_bytes_per_genome": state_bytes / n_genomes,
        "full_model_bytes": model_bytes,
        "full_over_genome": model_bytes / genome_bytes,
        "executors_seconds_per_generation": executors,
        "executors_same_archive": same,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
