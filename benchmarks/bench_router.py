"""What the router adds: latency over calling the upstream directly, requests/s, classifier latency. One run.

A fast fake upstream (``testkit.router_fakes.FakeUpstream``) and the router (``cycleqd-router serve``) run as separate
processes; this process drives both with httpx at concurrency 1 and 64, streaming and not, and measures the time
to the first byte (response headers, or the first chunk of a stream) and the total. The router routes by alias
(``coder``), so the classifier is not in the path; its latency is measured on its own. All on this machine's cores,
so the load generator competes with both servers: the numbers are upper bounds on overhead.

    .venv/bin/python benchmarks/bench_router.py [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _testkit  # noqa: F401  (testkit/ on sys.path and PYTHONPATH)
import httpx
import yaml
from rich.console import Console
from rich.table import Table

from serve.manifest import EliteEntry, EngineEntry, Health, ServingManifest, save_manifest


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


async def one(client: httpx.AsyncClient, url: str, body: dict, stream: bool) -> tuple[float, float]:
    t0 = time.perf_counter()
    async with client.stream("POST", url, json=body) as r:
        it = r.aiter_raw()
        first = await it.__anext__() if stream else None
        ttfb = time.perf_counter() - t0
        async for _ in it:
            pass
        assert r.status_code == 200, r.status_code
        del first
    return ttfb, time.perf_counter() - t0


async def load(url: str, body: dict, stream: bool, concurrency: int, n: int) -> tuple[list[float], list[float], float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60, trust_env=False) as client:
        for _ in range(min(20, n)):
            await one(client, url, body, stream)  # warm-up
        queue = list(range(n))
        ttfb: list[float] = []
        total: list[float] = []

        async def worker() -> None:
            while queue:
                queue.pop()
                a, b = await one(client, url, body, stream)
                ttfb.append(a)
                total.append(b)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return ttfb, total, n / (time.perf_counter() - t0)


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="requests per cell at concurrency 1 (x4 at 64)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_router.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
    up = subprocess.Popen(
        [sys.executable, "-c", "from testkit.router_fakes import FakeUpstream; import time; u = FakeUpstream().start();"
         " print(u.port, flush=True); time.sleep(1e9)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    port = int(up.stdout.readline())  # type: ignore[union-attr]
    upstream = f"http://127.0.0.1:{port}"
    from evolve.run_config import EvolveConfig
    from serve.materialise import skill_exemplars

    # the skill world's exemplars, as cycleqd-serve writes them for a world run (the classifier learns from them)
    m = ServingManifest(run="bench", skills=["code", "os", "db"], exemplars=skill_exemplars(EvolveConfig()))
    m.engines.append(EngineEntry(id="e0", url=upstream, device="cpu", mode="full", base_model="-", health=Health.READY))
    m.elites.append(
        EliteEntry(id="fake", engine_id="e0", served_model_name="fake", endpoint=f"{upstream}/v1", kind="full",
                   scores={"code": 0.9, "os": 0.9, "db": 0.9})
    )  # fmt: skip
    save_manifest(tmp / "manifest.json", m)
    policy = {"manifest": str(tmp / "manifest.json"), "cache_dir": str(tmp / "cache")}
    policy["classifier"] = {"exemplars_per_skill": 60}
    (tmp / "policy.yaml").write_text(yaml.safe_dump(policy))
    router = subprocess.Popen(
        [sys.executable, "-m", "router", "serve", "--policy", str(tmp / "policy.yaml"), "--port", "8790"],
        stdout=subprocess.DEVNULL, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
    )  # fmt: skip
    rows = []
    try:
        wait_http("http://127.0.0.1:8790/health")
        body = {"model": "coder", "messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 8}
        for stream in (False, True):
            for conc in (1, 64):
                n = args.requests * (4 if conc == 64 else 1)
                res = {}
                for target, url in (("direct", f"{upstream}/v1/chat/completions"),
                                    ("router", "http://127.0.0.1:8790/v1/chat/completions")):  # fmt: skip
                    b = dict(body, model="fake" if target == "direct" else "coder", stream=stream)
                    ttfb, total, rps = asyncio.run(load(url, b, stream, conc, n))
                    res[target] = {
                        "ttfb_p50_ms": 1e3 * pct(ttfb, 0.5), "ttfb_p99_ms": 1e3 * pct(ttfb, 0.99),
                        "total_p50_ms": 1e3 * pct(total, 0.5), "total_p99_ms": 1e3 * pct(total, 0.99),
                        "requests_per_s": rps,
                    }  # fmt: skip
                added = {k: res["router"][k] - res["direct"][k] for k in res["router"] if k.endswith("_ms")}
                rows.append({"stream": stream, "concurrency": conc, "requests": n, **res, "added_ms": added})
        from router.app import Router
        from router.policy import RoutingPolicy

        r = Router(RoutingPolicy.model_validate(policy))
        r.refresh_manifest(force=True)
        r.build_classifier()
        from evolve.evaluators import SKILL_NAMES, get_skill

        texts = [i.prompt for s in SKILL_NAMES for i in get_skill(s).items("test", 70)]
        r.classify(texts[0])
        times = []
        for t in texts:
            t0 = time.perf_counter()
            r.classify(t)
            times.append(time.perf_counter() - t0)
        clf = {"p50_ms": 1e3 * statistics.median(times), "p99_ms": 1e3 * pct(times, 0.99), "n": len(times)}
    finally:
        router.terminate()
        up.terminate()
        router.wait(30)
        up.wait(30)
    console = Console(width=170)
    table = Table(title="router overhead against a fast fake upstream (ms; router minus direct)")
    for c in ("stream", "conc.", "direct TTFB p50/p99", "router TTFB p50/p99", "added TTFB p50/p99",
              "added total p50/p99", "direct req/s", "router req/s"):  # fmt: skip
        table.add_column(c, justify="right")
    for row in rows:
        d, rt, a = row["direct"], row["router"], row["added_ms"]
        table.add_row(
            str(row["stream"]), str(row["concurrency"]),
            f"{d['ttfb_p50_ms']:.2f} / {d['ttfb_p99_ms']:.2f}", f"{rt['ttfb_p50_ms']:.2f} / {rt['ttfb_p99_ms']:.2f}",
            f"{a['ttfb_p50_ms']:.2f} / {a['ttfb_p99_ms']:.2f}", f"{a['total_p50_ms']:.2f} / {a['total_p99_ms']:.2f}",
            f"{d['requests_per_s']:.0f}", f"{rt['requests_per_s']:.0f}",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"classifier latency per request: p50 {clf['p50_ms']:.2f} ms, p99 {clf['p99_ms']:.2f} ms ({clf['n']} prompts)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows, "classifier": clf}
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
