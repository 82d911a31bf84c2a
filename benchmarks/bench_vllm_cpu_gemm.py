"""Why materialisation's share on the vLLM CPU engine cannot be cut by writing into the engine's weights directly.

On CPU, vLLM prepacks every linear layer's weight for oneDNN after loading and drops the plain tensor, so a new
child's weights must go through ``reload_weights`` (which re-packs them: about half of the hand-over). With oneDNN
off, the layers compute with ``torch.nn.functional.linear`` on plain weights, which could be written in place.
This benchmark scores the same children of a finished run both ways, each in a fresh process (the switch is read
when the engine is built), and compares: evaluation time, materialisation time (genome maths + hand-over), the
plain hand-over alone, and the validation scores (they should agree: only the GEMM kernel differs).

    .venv/bin/python benchmarks/bench_vllm_cpu_gemm.py --run .cache/real/run [--children 6]

Prints a table (torch / oneDNN ratios) and writes benchmarks/results/bench_vllm_cpu_gemm.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

MODES = ("onednn", "torch")


def _measure(run: Path, mode: str, children: int) -> dict:
    """One mode, in this process: score ``children`` elites of the run on validation, then time plain hand-overs."""
    if mode == "torch":
        import vllm._custom_ops as ops

        ops._supports_onednn = False  # read by vLLM's CPU GEMM dispatch when the layers are processed
    from evolve.run import Evolution
    from evolve.rundir import load_run_config

    ev = Evolution(run, load_run_config(run), resume=True)
    ids = sorted(ev.state.genomes)[:children]
    ev.score(ev.state.genomes[ids[0]])  # warm
    ev.timings.clear()
    t0 = time.perf_counter()
    scores = [ev.score(ev.state.genomes[e]) for e in ids]
    wall = time.perf_counter() - t0
    weights = ev.bases.materialise(ev.state.genomes[ids[0]])
    t0 = time.perf_counter()
    for _ in range(3):
        ev.engine.load_state_dict(weights)
    hand_over = (time.perf_counter() - t0) / 3
    return {
        "mode": mode,
        "children": len(ids),
        "wall_s": wall,
        "materialisation_s": ev.timings["materialisation"],
        "evaluation_s": ev.timings["evaluation"],
        "hand_over_s": hand_over,
        "scores": scores,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path(".cache/real/run"), help="a finished run on the vllm engine")
    ap.add_argument("--children", type=int, default=6, help="elites scored per mode")
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_vllm_cpu_gemm.json")
    args = ap.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(_measure(args.run, args.mode, args.children)))
        return
    if not (args.run / "run.json").is_file():
        raise SystemExit(f"{args.run} is not a run directory (no run.json): run `cycleqd-evolve run` or `make real`")
    from evolve.rundir import load_run_config

    engine = load_run_config(args.run).engine  # checked here, before two engines are built for nothing
    if engine != "vllm":
        raise SystemExit(f"{args.run} was evolved on the {engine} engine; this benchmark needs a vllm run")
    console = Console()
    res = {}
    for mode in MODES:
        console.print(f"scoring {args.children} children with the {mode} GEMM (a fresh process) ...")
        cmd = [sys.executable, __file__, "--run", str(args.run), "--children", str(args.children), "--mode", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            raise SystemExit(f"the {mode} measurement failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        res[mode] = json.loads(line.removeprefix("RESULT "))
    base, alt = res["onednn"], res["torch"]
    n = base["children"]
    table = Table(title=f"vLLM CPU engine, {n} children of {args.run}: oneDNN (vLLM's default) vs torch linear")
    for c in ("per child", "oneDNN (s)", "torch linear (s)", "torch / oneDNN"):
        table.add_column(c, justify="left" if c == "per child" else "right")
    rows = {
        "evaluation": "evaluation_s",
        "materialisation (maths + hand-over)": "materialisation_s",
        "wall (materialisation + evaluation)": "wall_s",
    }
    for label, key in rows.items():
        table.add_row(label, f"{base[key] / n:.3f}", f"{alt[key] / n:.3f}", f"{alt[key] / base[key]:.2f}x")
    table.add_row(
        "plain hand-over", f"{base['hand_over_s']:.3f}", f"{alt['hand_over_s']:.3f}",
        f"{alt['hand_over_s'] / base['hand_over_s']:.2f}x",
    )  # fmt: skip
    console.print(table)
    share = {m: r["materialisation_s"] / (r["materialisation_s"] + r["evaluation_s"]) for m, r in res.items()}
    same = base["scores"] == alt["scores"]
    console.print(
        f"materialisation share: oneDNN {100 * share['onednn']:.1f}%, torch linear {100 * share['torch']:.1f}%; "
        f"validation scores {'identical' if same else 'DIFFER'} across the two"
    )
    result = {
        "benchmark": "vllm_cpu_gemm",
        "run": str(args.run),
        "children": n,
        "modes": res,
        "materialisation_share": share,
        "wall_ratio_torch_over_onednn": alt["wall_s"] / base["wall_s"],
        "evaluation_ratio_torch_over_onednn": alt["evaluation_s"] / base["evaluation_s"],
        "scores_identical": same,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
