"""Router cold start: seconds from launching ``cycleqd-router serve`` with an empty cache dir to its first answers.

Issue 11 asks that a new replica answer within 2 s: requests that need no classifier (a pinned elite, an alias, the
weights header) are served at once, while the classifier's embeddings are computed in the background, and the URL
is announced only once the server answers. Each repetition starts a fresh router (empty ``cache_dir``; the
manifest carries the skill world's exemplars, 150 per skill to embed) in front of the fake upstream and polls,
every 10 ms from two threads, ``GET /v1/models`` and a pinned ``POST /v1/chat/completions`` until each answers
200. It also records when the URL line is printed, the router's CPU seconds (user + system, all threads) once both
have answered, and (polling every 100 ms) when a request for ``auto``, which needs the classifier, first gets a
200. The medians are reported.

For scale on a shared machine, the same is measured for a bare Starlette + httpx pass-through (the floor any
Python ASGI server pays: interpreter, imports, uvicorn). Wall-clock seconds depend on what else the machine runs;
CPU seconds much less so.

    .venv/bin/python benchmarks/cold_start.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _testkit  # noqa: F401  (testkit/ on sys.path and PYTHONPATH)
import httpx
import psutil
import yaml
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from reliability_router import PASSTHROUGH, free_port

from evolve.run_config import EvolveConfig
from serve.manifest import EliteEntry, EngineEntry, Health, ServingManifest, save_manifest
from serve.materialise import skill_exemplars
from testkit.router_fakes import FakeUpstream

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "SELECT the names of all employees"}]}


def poll(
    method: str, url: str, body: dict | None, t0: float, out: dict[str, float], key: str, stop: float,
    every: float = 0.01,
) -> None:  # fmt: skip
    """Seconds since ``t0`` until ``url`` first answers 200 (into ``out[key]``)."""
    with httpx.Client(timeout=5, trust_env=False) as c:
        while time.perf_counter() < stop:
            try:
                if c.request(method, url, json=body).status_code == 200:
                    out[key] = time.perf_counter() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(every)


def start_once(
    cmd: list[str], port: int, *, chat: bool, env: dict[str, str], classifier_wait: float = 15.0
) -> dict[str, float]:
    """One cold start of ``cmd``: seconds to the first stdout line, the first 200 of /v1/models and of a pinned
    chat request, and the process's CPU seconds when both had answered."""
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        stop = t0 + 60
        threads = [threading.Thread(target=poll, args=("POST", f"{base}/v1/chat/completions", CHAT, t0, out,
                                                       "chat_s", stop))]  # fmt: skip
        if chat:  # the pass-through has no /v1/models and no classifier
            threads.append(threading.Thread(target=poll, args=("GET", f"{base}/v1/models", None, t0, out,
                                                               "models_s", stop)))  # fmt: skip
            auto = {**CHAT, "model": "auto"}  # needs the classifier: 503 classifier_starting until it is built
            threads.append(threading.Thread(target=poll, args=("POST", f"{base}/v1/chat/completions", auto, t0, out,
                                                               "classifier_s", t0 + classifier_wait, 0.1)))  # fmt: skip
        for t in threads:
            t.start()
        if chat:
            proc.stdout.readline()  # type: ignore[union-attr]
            out["announced_s"] = time.perf_counter() - t0
        threads[0].join()
        if chat:
            threads[1].join()
        cpu = psutil.Process(proc.pid).cpu_times()  # when the first answers are in (not the classifier)
        out["cpu_s"] = cpu.user + cpu.system
        for t in threads:
            t.join()
    finally:
        proc.terminate()
        proc.wait(30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--classifier-wait", type=float, default=15.0, help="seconds to wait for the classifier")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cold_start.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cold-start-"))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    up = FakeUpstream().start()
    # the skill world's exemplars, as cycleqd-serve writes them: the classifier has real embeddings to compute
    exemplars = skill_exemplars(EvolveConfig(skills=["code", "os", "db"]))
    m = ServingManifest(run="bench", skills=["code", "os", "db"], exemplars=exemplars)
    m.engines.append(EngineEntry(id="e0", url=up.url, device="cpu", mode="full", base_model="-",
                                 health=Health.READY))  # fmt: skip
    m.elites.append(EliteEntry(id="fake", engine_id="e0", served_model_name="fake", endpoint=f"{up.url}/v1",
                               kind="full", scores={"code": 0.9, "os": 0.9, "db": 0.9}))  # fmt: skip
    save_manifest(tmp / "manifest.json", m)
    runs: dict[str, list[dict[str, float]]] = {"router": [], "pass-through": []}
    for rep in range(args.reps):
        policy = {
            "manifest": str(tmp / "manifest.json"),
            "cache_dir": str(tmp / f"cache-{rep}"),
            "classifier": {"exemplars_per_skill": 150},
        }  # fmt: skip  (a new, empty cache dir each time)
        (tmp / "policy.yaml").write_text(yaml.safe_dump(policy))
        port = free_port()
        cmd = [sys.executable, "-m", "router", "serve", "--policy", str(tmp / "policy.yaml"), "--port", str(port)]
        runs["router"].append(start_once(cmd, port, chat=True, env=env, classifier_wait=args.classifier_wait))
        port = free_port()
        runs["pass-through"].append(
            start_once([sys.executable, "-c", PASSTHROUGH, up.url, str(port)], port, chat=False, env=env)
        )
    up.stop()
    keys = ("announced_s", "models_s", "chat_s", "cpu_s", "classifier_s")
    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in keys if all(k in r for r in rs)}
        for name, rs in runs.items()
    }
    table = Table(title=f"cold start, empty cache dir: medians of {args.reps} (s)")
    cols = ("server", "URL announced", "/v1/models 200", "pinned chat 200", "CPU s at first 200s",
            "classifier ready", "pinned chat 200, each run")  # fmt: skip
    for c in cols:
        table.add_column(c, justify="right")
    for name, r in med.items():
        table.add_row(
            name, *(f"{r[k]:.2f}" if k in r else "-" for k in keys),
            " ".join(f"{x['chat_s']:.2f}" if "chat_s" in x else "x" for x in runs[name]),
        )  # fmt: skip
    Console(width=150).print(table)
    ready = [r["classifier_s"] for r in runs["router"] if "classifier_s" in r]
    print(f"classifier ready (auto answered 200) in {len(ready)} of {args.reps} runs within {args.classifier_wait} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "reps": args.reps,
                                    "median": med, "runs": runs}, indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
