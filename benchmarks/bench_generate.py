"""Generation throughput of the transformers engine: tokens/s at batch 1 against batch 64, in one run.

Uses a freshly initialised model of the default architecture (the speed of greedy decoding does not depend
on what the weights learned; an untrained model rarely emits EOS, so every sequence runs its full length).
Prints a table and writes benchmarks/results/bench_generate.json.

    .venv/bin/python benchmarks/bench_generate.py [--prompts 128] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from evolve.engines.hf import TransformersEngine
from evolve.evaluators import SKILL_NAMES, format_prompt, get_skill
from evolve.models.modeling import ArchSpec, new_model
from evolve.models.tokenizer import train_tokenizer


def measure(engine: TransformersEngine, prompts: list[str], new_tokens: int) -> tuple[float, int]:
    engine.generate_ids(prompts[:2], max_new_tokens=4)  # warm-up
    t0 = time.perf_counter()
    ids = engine.generate_ids(prompts, max_new_tokens=new_tokens)
    return time.perf_counter() - t0, sum(len(x) for x in ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=128, help="prompts for the batch-64 run")
    ap.add_argument("--single-prompts", type=int, default=16, help="prompts for the batch-1 run")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_generate.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    items = [i for s in SKILL_NAMES for i in get_skill(s).items("test", args.prompts)]
    tok = train_tokenizer([format_prompt(i.prompt) + " " + i.answer for i in items], vocab_size=1024)
    model = new_model(ArchSpec(), tok, seed=0)
    prompts = [format_prompt(i.prompt) for i in items][: args.prompts]
    rows = {}
    for batch, n in ((1, args.single_prompts), (64, args.prompts)):
        seconds, tokens = measure(TransformersEngine(model, tok, batch_size=batch), prompts[:n], args.new_tokens)
        rows[f"batch {batch}"] = {"prompts": n, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    ratio = rows["batch 64"]["tokens_per_s"] / rows["batch 1"]["tokens_per_s"]
    table = Table(title=f"transformers engine, greedy decoding ({sum(p.numel() for p in model.parameters()):,} params)")
    for col in ("run", "prompts", "new tokens", "seconds", "tokens/s"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        table.add_row(name, str(r["prompts"]), str(r["tokens"]), f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.0f}")
    console = Console()
    console.print(table)
    console.print(f"batch 64 / batch 1 throughput: [bold]{ratio:.1f}x[/bold]")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "generate",
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "new_tokens": args.new_tokens,
        "runs": rows,
        "batch64_over_batch1": ratio,
    }
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
