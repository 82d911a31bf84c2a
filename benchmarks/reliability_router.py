"""Router reliability under load: the router against a bare pass-through, at concurrency 64 and 1, in one run.

Three processes besides this one: the fake upstream (``testkit.router_fakes.FakeUpstream``, streams of ``--chunks``
events), the router (``cycleqd-router serve``, routing by alias so every request takes the full path but the
classifier) and, as the baseline measured in the same run, a bare Starlette + httpx pass-through that forwards the
same bytes to the same upstream. ``--before DIR`` adds a fourth: the router package found in ``DIR`` (a copy of
``router/`` from before a change, say), so that a change is measured before and after under the same load.

Each cell (a concurrency and its request count: 2,000 at 64, then 1,000 at 1 by default) sends the same requests,
half of them streaming, to every target in alternating blocks (see ``load``); the table compares each router's
CPU per request and latency percentiles with the pass-through's as ratios. Also: errors (any non-200, a stream
without its ``[DONE]`` or with an error event) and each server's resident memory at its 1,000th request and at its
last (growth must stay under 10%). The router's start-up is measured by ``benchmarks/cold_start.py``.

    .venv/bin/python benchmarks/reliability_router.py [--concurrency 64,1] [--requests 2000,1000] [--chunks 16]
        [--block 500] [--before DIR]
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
from dataclasses import dataclass, field
from pathlib import Path

import _testkit  # noqa: F401  (testkit/ on sys.path and PYTHONPATH)
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


@dataclass
class Target:
    """One server under load: its URL, the model to ask for, and what its requests measured so far."""

    name: str
    url: str
    model: str
    pid: int
    done: int = 0
    lat: dict[str, list[float]] = field(default_factory=lambda: {"stream": [], "json": []})
    errors: dict[str, int] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)
    busy_s: float = 0.0
    cpu_s: float = 0.0
    cells: dict[int, dict] = field(default_factory=dict)  # per concurrency: what ``load`` measured there


async def load(targets: list[Target], n: int, concurrency: int, block: int, last: int) -> None:
    """``n`` requests to each target (every other one streaming) from ``concurrency`` workers, in blocks of
    ``block`` that alternate between the targets (ABBA order).

    Interleaving is what makes the comparison fair on a shared machine: run one after the other, the two runs met
    different background load (on 2 busy cores the same pass-through measured p99 1.1 s in one run and 2.9 s in the
    next), and that difference, not the router, was most of the "p99 ratio". RSS of each target is sampled at its
    1,000th request and at its ``last`` (counted over every cell of the run)."""
    bodies = [
        {"model": "", "messages": [{"role": "user", "content": f"def add{i % 97}(a, b):"}], "max_tokens": 8,
         "stream": i % 2 == 1}
        for i in range(n)
    ]  # fmt: skip
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    clients = {t.name: httpx.AsyncClient(limits=limits, timeout=60, trust_env=False) for t in targets}
    procs = {t.name: psutil.Process(t.pid) for t in targets}
    try:
        for t in targets:
            for b in bodies[:concurrency]:
                await one(clients[t.name], t.url, {**b, "model": t.model})  # warm-up: connections, first calls

        async def run_block(t: Target, ids: range) -> None:
            nxt = iter(ids)

            async def worker() -> None:
                for i in nxt:
                    body = {**bodies[i], "model": t.model}
                    lat, err = await one(clients[t.name], t.url, body)
                    t.lat["stream" if body["stream"] else "json"].append(lat)
                    if err:
                        t.errors[err] = t.errors.get(err, 0) + 1
                    t.done += 1
                    if t.done in (1000, last):
                        t.rss[str(t.done)] = procs[t.name].memory_info().rss

            t0, c0 = time.perf_counter(), sum(procs[t.name].cpu_times()[:2])
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            t.busy_s += time.perf_counter() - t0
            t.cpu_s += sum(procs[t.name].cpu_times()[:2]) - c0

        for k, lo in enumerate(range(0, n, block)):
            ids = range(lo, min(n, lo + block))
            for t in targets if k % 2 == 0 else targets[::-1]:
                await run_block(t, ids)
        for t in targets:  # this cell's figures are complete: the next cell starts from zero (RSS spans the run)
            t.cells[concurrency] = {"lat": t.lat, "errors": t.errors, "busy_s": t.busy_s, "cpu_s": t.cpu_s}
            t.lat, t.errors, t.busy_s, t.cpu_s = {"stream": [], "json": []}, {}, 0.0, 0.0
    finally:
        for c in clients.values():
            await c.aclose()


def summary(cell: dict) -> dict:
    """One target's figures in one cell (``Target.cells[concurrency]``)."""
    lat = cell["lat"]["stream"] + cell["lat"]["json"]
    return {
        "requests": len(lat), "errors": sum(cell["errors"].values()), "error_kinds": cell["errors"],
        "requests_per_s": len(lat) / cell["busy_s"], "cpu_ms_per_request": 1e3 * cell["cpu_s"] / len(lat),
        **{f"p{q}_ms": 1e3 * pct(lat, q / 100) for q in (50, 90, 99)}, "max_ms": 1e3 * max(lat),
        **{f"{k}_p{q}_ms": 1e3 * pct(v, q / 100) for k, v in cell["lat"].items() for q in (50, 99)},
    }  # fmt: skip


def memory(t: Target, last: int) -> dict:
    out = {"rss_at_1000_mib": t.rss.get("1000", 0) / 2**20, "rss_at_end_mib": t.rss.get(str(last), 0) / 2**20}
    out["rss_growth"] = out["rss_at_end_mib"] / out["rss_at_1000_mib"] - 1 if out["rss_at_1000_mib"] else None
    return out


RATIOS = ("cpu_ms_per_request", "p50_ms", "p90_ms", "p99_ms", "max_ms", "stream_p99_ms", "json_p99_ms")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def start_router(policy: Path, port: int, env: dict[str, str], source: Path | None = None) -> subprocess.Popen:
    """``cycleqd-router serve`` on ``port``; with ``source``, the ``router`` package found there (the rest of the
    project from this checkout)."""
    if source is not None:
        env = dict(env, PYTHONPATH=os.pathsep.join([str(source), env.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, "-m", "router", "serve", "--policy", str(policy), "--port", str(port)],
        stdout=subprocess.DEVNULL, env=env,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="64,1", help="the cells' concurrencies, comma-separated")
    ap.add_argument("--requests", default="2000,1000", help="requests per target in each cell, comma-separated")
    ap.add_argument("--chunks", type=int, default=16, help="events per upstream stream")
    ap.add_argument("--block", type=int, default=500, help="requests per block; blocks alternate between targets")
    ap.add_argument("--before", type=Path, help="a directory holding another router package, measured alongside")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reliability_router.json")
    args = ap.parse_args()
    cells = list(zip(ints(args.concurrency), ints(args.requests), strict=True))
    total = sum(n for _, n in cells)
    if args.before is not None and not (args.before / "router" / "__init__.py").is_file():
        ap.error(f"--before {args.before}: no router package there")
    tmp = Path(tempfile.mkdtemp(prefix="reliability-router-"))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    procs: list[subprocess.Popen] = []
    up = subprocess.Popen(
        [sys.executable, "-c", "from testkit.router_fakes import FakeUpstream; import sys, time; "
         "u = FakeUpstream(chunks=int(sys.argv[1])).start(); print(u.port, flush=True); time.sleep(1e9)",
         str(args.chunks)],
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
        routers = [("router", None)] + ([("router (before)", args.before.resolve())] if args.before else [])
        ports = {name: free_port() for name, _ in routers}
        started = {name: start_router(tmp / "policy.yaml", ports[name], env, src) for name, src in routers}
        pport = free_port()
        passthrough = subprocess.Popen([sys.executable, "-c", PASSTHROUGH, upstream, str(pport)], env=env)
        procs += [*started.values(), passthrough]
        for name in started:
            wait_http(f"http://127.0.0.1:{ports[name]}/health")
        wait_http(f"http://127.0.0.1:{pport}/v1/chat/completions")
        time.sleep(3)  # the routers' background classifier build (small here) is done before the load starts
        targets = [
            *(Target(name, f"http://127.0.0.1:{ports[name]}/v1/chat/completions", "coder", started[name].pid)
              for name in started),
            Target("pass-through", f"http://127.0.0.1:{pport}/v1/chat/completions", "fake", passthrough.pid),
        ]  # fmt: skip
        for conc, n in cells:
            asyncio.run(load(targets, n, conc, min(args.block, n), total))
        results = {str(conc): {t.name: summary(t.cells[conc]) for t in targets} for conc, _ in cells}
        mem = {t.name: memory(t, total) for t in targets}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    console = Console(width=170)
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for conc, n in cells:
        res = results[str(conc)]
        table = Table(title=f"{n} requests at concurrency {conc}, half streaming, {args.chunks} chunks a stream (ms)")
        cols = ("target", "errors", "CPU ms/req", "p50", "p90", "p99", "max", "stream p99", "json p99", "req/s")
        for c in cols:
            table.add_column(c, justify="right")
        for name, r in res.items():
            table.add_row(
                name, str(r["errors"]), f"{r['cpu_ms_per_request']:.2f}", f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}",
                f"{r['p99_ms']:.1f}", f"{r['max_ms']:.1f}", f"{r['stream_p99_ms']:.1f}", f"{r['json_p99_ms']:.1f}",
                f"{r['requests_per_s']:.0f}",
            )  # fmt: skip
        pt = res["pass-through"]
        ratios[str(conc)] = {}
        for name in started:
            q = ratios[str(conc)][name] = {k: res[name][k] / pt[k] for k in RATIOS}
            table.add_row(f"{name} / pass-through", "", *(f"{q[k]:.2f}x" for k in RATIOS), "")
        console.print(table)
    table = Table(title=f"resident memory over the run ({total} requests a target)")
    for c in ("target", "RSS @1000 (MiB)", "RSS at the end (MiB)", "growth"):
        table.add_column(c, justify="right")
    for name, r in mem.items():
        growth = "-" if r["rss_growth"] is None else f"{100 * r['rss_growth']:+.1f}%"
        table.add_row(name, f"{r['rss_at_1000_mib']:.1f}", f"{r['rss_at_end_mib']:.1f}", growth)
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "chunks": args.chunks, "block": args.block,
              "cells": [{"concurrency": c, "requests": n} for c, n in cells],
              "results": results, "ratios": ratios, "memory": mem}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
