"""What one OS-sandbox episode costs to start and tear down (goal: under 20 ms), against a plain process.

Measured in the same run, one after another, on this machine's cores:

* baseline: ``subprocess.run(["/usr/bin/true"])``, a process start with no sandbox;
* ``os_sandbox.run(["/usr/bin/true"])`` unprivileged (user namespace, HumanEval and graders) and privileged (root
  with cut capabilities, its /etc with the account files);
* a ``Session`` (AgentBench OS episode): open, one ``execute("true")``, close; and one ``execute`` alone in an
  open session (the per-turn cost).

Each row is the median and p90 of ``--episodes`` episodes after a few warm-up ones; "added" is the row's median
minus the baseline's. The machine's load average is recorded with the numbers, since a loaded machine (other
work on the same cores) inflates them.

    .venv/bin/python benchmarks/bench_sandbox.py [--episodes 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from evolve.evaluators import os_sandbox

GOAL_MS = 20.0


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def measure(fn: Callable[[], object], episodes: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(episodes):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"p50_ms": 1e3 * statistics.median(times), "p90_ms": 1e3 * pct(times, 0.9), "n": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_sandbox.json")
    args = ap.parse_args()
    console = Console(width=150)
    unavailable = {
        mode: os_sandbox.available(privileged=mode == "privileged") for mode in ("unprivileged", "privileged")
    }
    if all(unavailable.values()):
        console.print(f"the OS sandbox is unavailable here: {unavailable}")
        sys.exit(1)
    load_before = os.getloadavg()

    def session_episode() -> None:
        with os_sandbox.Session() as s:
            s.execute("true")

    rows: dict[str, dict] = {
        "baseline: subprocess.run(true)": measure(lambda: subprocess.run(["/usr/bin/true"]), args.episodes)
    }
    if unavailable["unprivileged"] is None:
        rows["run(true), unprivileged"] = measure(lambda: os_sandbox.run(["/usr/bin/true"]), args.episodes)
    if unavailable["privileged"] is None:
        rows["run(true), privileged"] = measure(
            lambda: os_sandbox.run(["/usr/bin/true"], privileged=True), args.episodes
        )
        rows["Session open + execute + close"] = measure(session_episode, args.episodes)
        with os_sandbox.Session() as s:
            rows["Session.execute(true), open session"] = measure(lambda: s.execute("true"), args.episodes)
    cgroups, why = os_sandbox._cgroups()
    base = rows["baseline: subprocess.run(true)"]["p50_ms"]

    table = Table(
        title=f"OS sandbox: start + teardown per episode (ms, {args.episodes} episodes; goal < {GOAL_MS:.0f})"
    )
    for c in ("episode", "p50", "p90", "added p50", "goal"):
        table.add_column(c, justify="right" if c != "episode" else "left")
    for name, r in rows.items():
        r["added_p50_ms"] = r["p50_ms"] - base
        is_episode = not name.startswith(("baseline", "Session.execute"))
        goal = ("met" if r["p50_ms"] < GOAL_MS else "missed") if is_episode else ""
        table.add_row(name, f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['added_p50_ms']:.2f}", goal)
    console.print(table)
    load_after = os.getloadavg()
    console.print(
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after, on {os.cpu_count()} CPUs; process cap: "
        + (f"pids cgroup ({'v2' if cgroups.v2 else 'v1'}, {cgroups.parent})" if cgroups else f"RLIMIT_NPROC ({why})")
    )
    for mode, reason in unavailable.items():
        if reason:
            console.print(f"{mode} sandbox skipped: {reason}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": {"before": load_before, "after": load_after},
        "goal_ms": GOAL_MS,
        "process_cap": ("cgroup v2" if cgroups.v2 else "cgroup v1") if cgroups else "rlimit_nproc",
        "unavailable": unavailable,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
