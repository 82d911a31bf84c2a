"""Router reliability under load: 10,000 requests at concurrency 64, half streaming, against the fake upstream.

Three processes besides this one: the fake upstream (``router.testing.FakeUpstream``), the router
(``cycleqd-router serve``, routing by alias so every request takes the full path but the classifier) and, as the
baseline measured in the same run, a bare Starlette + httpx pass-through that forwards the same bytes to the same
upstream. Each gets the same load; the table compares latency percentiles as router / pass-through ratios. Also:
errors (any non-200, a stream without its ``[DONE]`` or with an error event), the router's resident memory at the
1,000th request and at the last (growth must stay under 10%), and how long a router with an empty cache directory
takes to announce its URL and answer ``GET /v1/models`` (the classifier's embeddings are built in the background;
meanwhile a pinned request is served and one that needs the classifier gets a quick 503 with Retry-After).

    .venv/bin/python benchmarks/reliability_router.py [--requests 10000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml
from rich.console import Console
from rich.table import Table

from serve.manifest import EliteEntry, EngineEntry, Health, ServingManifest, save_manifest

PASSTHROUGH = r"""
import json, sys
import httpx, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

upstream, port = sys.argv[1], int(sys.argv[2])
client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
                           timeout=60, trust_env=False)

async def chat(request):
    body = await request.body()
    req = client.build_request("POST", upstream + "/v1/chat/completions", content=body,
                               headers={"content-type": "application/json"})
    resp = await client.send(req, stream=True)
    if json.loads(body).get("stream"):
        async def relay():
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()
        return StreamingResponse(relay(), media_type=resp.headers["content-type"])
    content = await resp.aread()
    await resp.aclose()
    return Response(content, status_code=resp.status_code, media_type=resp.headers["content-type"])

uvicorn.run(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]), host="127.0.0.1",
            port=port, log_level="warning")
"""


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{url} did not come up")


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, str | None]:
    """Latency and the error (None when the answer was complete and correct)."""
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as r:
            data = await r.aread()
        if r.status_code != 200:
            return time.perf_counter() - t0, f"HTTP {r.status_code}"
        if body["stream"] and (not data.rstrip().endswith(b"data: [DONE]") or b'"error"' in data):
            return time.perf_counter() - t0, "broken stream"
        if not body["stream"] and b'"choices"' not in data:
            return time.perf_counter() - t0, "no choices"
    except httpx.HTTPError as exc:
        return time.perf_counter() - t0, type(exc).__name__
    return time.perf_counter() - t0, None


async def load(url: str, model: str, n: int, concurrency: int, pid: int | None) -> dict:
    """``n`` requests (every other one streaming) from ``concurrency`` workers; RSS of ``pid`` at 1,000 and at n."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    bodies = [
        {"model": model, "messages": [{"role": "user", "content": f"def add{i % 97}(a, b):"}], "max_tokens": 8,
         "stream": i % 2 == 1}
        for i in range(n)
    ]  # fmt: skip
    proc = psutil.Process(pid) if pid else None
    rss: dict[str, int] = {}
    async with httpx.AsyncClient(limits=limits, timeout=60, trust_env=False) as client:
        for b in bodies[:64]:
            await one(client, url, b)  # warm-up: connections, imports, first-call paths
        lat: list[float] = []
        errors: dict[str, int] = {}
        nxt = iter(range(n))
        done = 0

        async def worker() -> None:
            nonlocal done
            for i in nxt:
                t, err = await one(client, url, bodies[i])
                lat.append(t)
                if err:
                    errors[err] = errors.get(err, 0) + 1
                done += 1
                if proc and done in (1000, n):
                    rss[str(done)] = proc.memory_info().rss

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    out = {
        "requests": n, "errors": sum(errors.values()), "error_kinds": errors, "requests_per_s": n / wall,
        **{f"p{q}_ms": 1e3 * pct(lat, q / 100) for q in (50, 90, 99)}, "max_ms": 1e3 * max(lat),
    }  # fmt: skip
    if rss:
        out["rss_at_1000_mib"] = rss.get("1000", 0) / 2**20
        out["rss_at_end_mib"] = rss.get(str(n), 0) / 2**20
        out["rss_growth"] = rss[str(n)] / rss["1000"] - 1 if "1000" in rss else None
    return out


def cold_start(policy: dict, tmp: Path) -> dict:
    """Seconds from launching ``cycleqd-router serve`` with an empty cache dir to the URL line and to /v1/models,
    and from launching the bare pass-through to its first answer."""
    cold = {**policy, "cache_dir": str(tmp / "cold-cache"), "classifier": {"exemplars_per_skill": 150}}
    (tmp / "cold.yaml").write_text(yaml.safe_dump(cold))
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "serve", "--policy", str(tmp / "cold.yaml"), "--port", str(port)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        proc.stdout.readline()  # type: ignore[union-attr]
        announced = time.perf_counter() - t0
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        answered = time.perf_counter() - t0
        assert models.status_code == 200, models.text
        body = {"model": "auto", "messages": [{"role": "user", "content": "SELECT the names of all employees"}]}
        t1 = time.perf_counter()
        clf = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30)
        clf_s = time.perf_counter() - t1
        pinned = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**body, "model": "fake"}, timeout=30)
    finally:
        proc.terminate()
        proc.wait(30)
    port = free_port()
    t0 = time.perf_counter()
    bare = subprocess.Popen([sys.executable, "-c", PASSTHROUGH, "http://127.0.0.1:9", str(port)])
    try:
        passthrough = wait_http(f"http://127.0.0.1:{port}/v1/chat/completions")
    finally:
        bare.terminate()
        bare.wait(30)
    return {
        "passthrough_s": passthrough, "url_announced_s": announced, "models_answered_s": answered,
        "pinned_status": pinned.status_code,
        "classifier_request_status": clf.status_code, "classifier_request_s": clf_s,
        "classifier_request_code": clf.json().get("error", {}).get("code") if clf.status_code != 200 else None,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--no-cold-start", action="store_true", help="skip the empty-cache start-up measurement")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reliability_router.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="reliability-router-"))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    procs: list[subprocess.Popen] = []
    up = subprocess.Popen(
        [sys.executable, "-c", "from router.testing import FakeUpstream; import time; u = FakeUpstream().start(); "
         "print(u.port, flush=True); time.sleep(1e9)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs.append(up)
    try:
        upstream = f"http://127.0.0.1:{int(up.stdout.readline())}"  # type: ignore[union-attr]
        m = ServingManifest(run="bench", skills=["code", "os", "db"])
        m.engines.append(EngineEntry(id="e0", url=upstream, device="cpu", mode="full", base_model="-",
                                     health=Health.READY))  # fmt: skip
        m.elites.append(EliteEntry(id="fake", engine_id="e0", served_model_name="fake", endpoint=f"{upstream}/v1",
                                   kind="full", scores={"code": 0.9, "os": 0.9, "db": 0.9}))  # fmt: skip
        save_manifest(tmp / "manifest.json", m)
        policy = {"manifest": str(tmp / "manifest.json"), "cache_dir": str(tmp / "cache"),
                  "classifier": {"exemplars_per_skill": 20}}  # fmt: skip
        (tmp / "policy.yaml").write_text(yaml.safe_dump(policy))
        rport, pport = free_port(), free_port()
        router = subprocess.Popen(
            [sys.executable, "-m", "router", "serve", "--policy", str(tmp / "policy.yaml"), "--port", str(rport)],
            stdout=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        passthrough = subprocess.Popen([sys.executable, "-c", PASSTHROUGH, upstream, str(pport)], env=env)
        procs += [router, passthrough]
        wait_http(f"http://127.0.0.1:{rport}/health")
        wait_http(f"http://127.0.0.1:{pport}/v1/chat/completions")
        time.sleep(3)  # the router's background classifier build (small here) is done before the load starts
        results = {}
        for name, url, model, pid in (
            ("pass-through", f"http://127.0.0.1:{pport}/v1/chat/completions", "fake", passthrough.pid),
            ("router", f"http://127.0.0.1:{rport}/v1/chat/completions", "coder", router.pid),
        ):
            results[name] = asyncio.run(load(url, model, args.requests, args.concurrency, pid))
        start = None if args.no_cold_start else cold_start(policy, tmp)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    console = Console(width=160)
    table = Table(title=f"{args.requests} requests at concurrency {args.concurrency}, half streaming (ms)")
    for c in ("target", "errors", "p50", "p90", "p99", "max", "req/s", "RSS @1000 / end (MiB)", "RSS growth"):
        table.add_column(c, justify="right")
    for name, r in results.items():
        table.add_row(
            name, str(r["errors"]), f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['p99_ms']:.1f}",
            f"{r['max_ms']:.1f}", f"{r['requests_per_s']:.0f}",
            f"{r['rss_at_1000_mib']:.1f} / {r['rss_at_end_mib']:.1f}", f"{100 * r['rss_growth']:+.1f}%",
        )  # fmt: skip
    rt, pt = results["router"], results["pass-through"]
    ratios = {k: rt[k] / pt[k] for k in ("p50_ms", "p90_ms", "p99_ms")}
    table.add_row("router / pass-through", "", *(f"{ratios[k]:.2f}x" for k in ratios), "", "", "", "")
    console.print(table)
    if start:
        console.print(
            f"cold start (empty cache dir): URL announced after {start['url_announced_s']:.2f} s, /v1/models "
            f"answered after {start['models_answered_s']:.2f} s (a bare pass-through answers after "
            f"{start['passthrough_s']:.2f} s); "
            f"meanwhile a pinned request got {start['pinned_status']}, one needing the classifier "
            f"{start['classifier_request_status']} ({start['classifier_request_code']}) in "
            f"{start['classifier_request_s']:.2f} s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "concurrency": args.concurrency,
              "results": results, "ratios": ratios, "cold_start": start}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
