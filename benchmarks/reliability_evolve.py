"""Evolution under SIGKILL: one run killed at random points and resumed each time ends where an uninterrupted run
ends, every archive cell and every genome identical.

    python benchmarks/reliability_evolve.py [--points 5] [--generations 12] [--seed 0]

Miniature models (``tests/evolve/minis.py``: a 2-layer Llama bootstrapped in seconds) keep it to minutes on a
CPU. Both runs go through the command line exactly as a user (or the RayJob in ``deploy/``) runs them:

1. the reference: ``cycleqd-evolve run`` from start to end, timed;
2. the same configuration in another directory, SIGKILLed (the whole process group, no chance to clean up) at
   ``--points`` random points, each drawn as a generation to reach and a delay of up to a second after that
   generation's save (so kills land inside set-up, scoring and saves alike), then restarted as the RayJob does:
   ``--resume`` when ``run.json`` exists, a fresh start otherwise; after the last kill it runs to the end.

It prints a table of the kill points and the comparison, and writes ``benchmarks/results/reliability_evolve.json``:
the points, both wall times and their ratio (the cost of the restarts, each paying the start-up again), and
whether the final archives, elites and genomes are identical (the figure that matters: it must be true).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evolve.bootstrap import run_bootstrap  # noqa: E402
from evolve.rundir import RUN_FILE, STATE_FILE, RunState, archive_ids, genomes_equal  # noqa: E402
from tests.evolve.minis import mini_bootstrap_config, mini_evolve_config  # noqa: E402

console = Console()


def saved_generation(run_dir: Path) -> int:
    """The generation count in the run's saved state; -1 before the first save."""
    try:
        with safe_open(run_dir / STATE_FILE, framework="pt") as f:
            return json.loads(f.metadata()["state"])["generation"]
    except Exception:
        return -1


def command(run_dir: Path, config: Path) -> list[str]:
    if (run_dir / RUN_FILE).exists():
        return [sys.executable, "-m", "evolve", "run", "--out", str(run_dir), "--resume"]
    return [sys.executable, "-m", "evolve", "run", "--out", str(run_dir), "--config", str(config)]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with log.open("ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def reference_run(run_dir: Path, config: Path, log: Path) -> tuple[float, float]:
    """Wall time of the whole run, and until its first save (start-up, SVD bases, scoring the experts)."""
    t0 = time.perf_counter()
    proc = start(command(run_dir, config), log)
    first_save = None
    while proc.poll() is None:
        if first_save is None and saved_generation(run_dir) >= 0:
            first_save = time.perf_counter() - t0
        time.sleep(0.01)
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed; see {log}")
    total = time.perf_counter() - t0
    return total, first_save if first_save is not None else total


def killed_run(run_dir: Path, config: Path, log: Path, points: list[tuple[int, float]]) -> tuple[float, list[dict]]:
    """Run to the end, SIGKILLing the process group at each (generation, delay) point."""
    t0 = time.perf_counter()
    kills = []
    for target, delay in points:
        cmd = command(run_dir, config)
        resumed_from = saved_generation(run_dir)
        life = time.perf_counter()
        proc = start(cmd, log)
        while saved_generation(run_dir) < target and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append(
            {
                "target_generation": target,
                "delay_s": round(delay, 3),
                "started_as": "resume" if "--resume" in cmd else "fresh",
                "resumed_from_generation": resumed_from,
                "saved_generation_at_kill": saved_generation(run_dir),
                "seconds_into_life": round(time.perf_counter() - life, 2),
                "finished_before_kill": finished,
            }
        )
    proc = start(command(run_dir, config), log)
    if proc.wait() != 0:
        raise SystemExit(f"the final resume failed; see {log}")
    return time.perf_counter() - t0, kills


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=5)
    ap.add_argument("--generations", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill points (the runs themselves use seed 0)")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "reliability-evolve")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reliability_evolve.json")
    args = ap.parse_args()
    result = campaign(args.work, args.points, args.generations, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"results: {args.out}")
    if not result["identical"]:
        raise SystemExit(1)


def campaign(work: Path, n_points: int, generations: int, seed: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    models = work / "models"
    with console.status("bootstrapping the miniature models"):
        run_bootstrap(mini_bootstrap_config(), models, console=Console(quiet=True))
    config = work / "evolve.yaml"
    cfg = mini_evolve_config(models, generations=generations)
    config.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    ref_dir, run_dir = work / "reference", work / "killed"
    for d in (ref_dir, run_dir):
        subprocess.run(["rm", "-rf", str(d)], check=True)
    log = work / "runs.log"
    log.write_text("")

    with console.status("reference run (uninterrupted)"):
        t_ref, t_setup = reference_run(ref_dir, config, log)
    # A point is a generation to wait for and a delay after it: -1 is before the first save (start-up, SVD bases,
    # scoring the experts: a delay up to the reference's set-up time); g is after generation g's save (a delay up
    # to one generation's time, so the kill lands in scoring or in the next save).
    rng = random.Random(seed)
    per_generation = (t_ref - t_setup) / max(generations, 1)
    drawn = sorted((rng.randint(-1, generations - 2), rng.random()) for _ in range(n_points))  # all before the end
    points = [(g, f * (t_setup if g < 0 else per_generation)) for g, f in drawn]
    with console.status(f"the same run, SIGKILLed at {n_points} random points and resumed each time"):
        t_killed, kills = killed_run(run_dir, config, log, points)

    ref, got = RunState.load(ref_dir / STATE_FILE), RunState.load(run_dir / STATE_FILE)
    checks = {
        "generation": ref.generation == got.generation == generations,
        "archives (cells, elite ids, qualities)": archive_ids(ref) == archive_ids(got),
        "elites (scores, lineage)": ref.elites == got.elites,
        "genomes (bit for bit)": sorted(ref.genomes) == sorted(got.genomes) and genomes_equal(ref, got),
        "random generators": ref.np_rng.bit_generator.state == got.np_rng.bit_generator.state
        and bool((ref.torch_gen.get_state() == got.torch_gen.get_state()).all()),
    }

    t = Table(title=f"SIGKILL at {n_points} random points of a {generations}-generation run")
    for c in ("kill", "started as", "from gen", "target", "delay s", "saved gen at kill", "s into life"):
        t.add_column(c, justify="right")
    for i, k in enumerate(kills, 1):
        saved = str(k["saved_generation_at_kill"]) + (" (done)" if k["finished_before_kill"] else "")
        t.add_row(
            str(i), k["started_as"], str(k["resumed_from_generation"]), str(k["target_generation"]),
            f"{k['delay_s']:.2f}", saved, f"{k['seconds_into_life']:.1f}",
        )  # fmt: skip
    console.print(t)
    c = Table(title="killed-and-resumed run vs the uninterrupted one")
    c.add_column("compared")
    c.add_column("identical")
    for name, ok in checks.items():
        c.add_row(name, "[green]yes[/green]" if ok else "[red]NO[/red]")
    c.add_row("genomes compared", str(len(ref.genomes)))
    c.add_row("wall time: reference / killed+resumed", f"{t_ref:.1f} s / {t_killed:.1f} s ({t_killed / t_ref:.2f}x)")
    console.print(c)
    return {
        "generations": generations,
        "points": n_points,
        "seed": seed,
        "kills": kills,
        "checks": checks,
        "identical": all(checks.values()),
        "genomes_compared": len(ref.genomes),
        "reference_s": round(t_ref, 2),
        "reference_setup_s": round(t_setup, 2),
        "killed_and_resumed_s": round(t_killed, 2),
        "time_ratio": round(t_killed / t_ref, 3),
    }


if __name__ == "__main__":
    main()
