"""``cycleqd-router serve --workers N``: requests/s and CPU ms per request for 1, 2 and 4 workers. One run.

Three processes besides the router's: the fake upstream (``testkit.router_fakes.FakeUpstream``, its own process so it
does not share a GIL with anything), this load generator (httpx, one asyncio loop, ``--concurrency`` requests in
flight on as many keep-alive connections) and the router (``python -m router.cli serve --workers N``: a
supervisor and N workers). Each round starts a router per worker count, warms it up, then times
``--requests`` non-streaming chat requests routed by alias (the classifier is not in the path, so the manifest
carries no exemplars and no worker spends CPU building one). CPU is user + system time of the router's
process tree (supervisor and workers) over the timed requests, divided by the requests; the same for the upstream
and the load generator, which share the machine's cores with the router. Which worker served how many comes from
each worker's own metric file (a ``PROMETHEUS_MULTIPROC_DIR`` given to the router). Ratios are against the
1-worker router measured in the same round; rounds alternate the worker counts, and the table shows the median.

    .venv/bin/python benchmarks/bench_workers.py [--workers 1 2 4] [--requests 4000] [--concurrency 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _testkit  # noqa: F401  (testkit/ on sys.path and PYTHONPATH)
import httpx
import psutil
import yaml
from rich.console import Console
from rich.table import Table

from serve.manifest import EliteEntry, EngineEntry, Health, ServingManifest, save_manifest

sys.path.insert(0, str(Path(__file__).parent))
from reliability_router import free_port, pct

UPSTREAM = (
    "from testkit.router_fakes import FakeUpstream; import time; u = FakeUpstream().start(); print(u.port, flush=True);"
    " time.sleep(1e9)"
)


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def wait_idle(pid: int, timeout: float = 60.0) -> None:
    """Until a process tree uses under 5% of a core (its start-up done), so it is not counted as request CPU."""
    deadline = time.monotonic() + timeout
    last = tree_cpu(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = tree_cpu(pid)
        if now - last < 0.05:
            return
        last = now


def self_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


class RawConnection:
    """One keep-alive HTTP/1.1 connection that posts the same request again and again: a load generator that
    costs about a tenth of httpx's CPU per request, so that on a small machine the router, not its client, is
    what runs out of cores (httpx's ``--client httpx`` run shows the difference)."""

    def __init__(self, host: str, port: int, path: str, body: bytes) -> None:
        self.host, self.port = host, port
        self.request = (
            f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:])}
        if headers.get(b"transfer-encoding") == b"chunked":
            while (size := int((await self.reader.readline()).strip(), 16)) > 0:
                await self.reader.readexactly(size + 2)
            await self.reader.readline()
        else:
            await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load(
    url: str, body: dict, concurrency: int, n: int, warmup: int, pids: dict[str, int], client: str
) -> dict[str, Any]:
    """``warmup`` requests, then ``n`` timed ones with ``concurrency`` in flight; the CPU each process spent."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60, trust_env=False) as hx:
        u = httpx.URL(url)
        raws = [RawConnection(u.host, u.port or 80, u.path, json.dumps(body).encode()) for _ in range(concurrency)]

        async def post_httpx() -> int:
            return (await hx.post(url, json=body)).status_code

        senders = [raw.post for raw in raws] if client == "raw" else [post_httpx] * concurrency
        latencies: list[float] = []
        errors = 0

        async def run(count: int, keep: bool) -> None:
            left = [count]

            async def worker(send: Any) -> None:
                nonlocal errors
                while left[0] > 0:
                    left[0] -= 1
                    t0 = time.perf_counter()
                    if await send() != 200:
                        errors += 1
                    if keep:
                        latencies.append(time.perf_counter() - t0)

            await asyncio.gather(*(worker(send) for send in senders))

        await run(warmup, keep=False)  # every connection opened (and accepted by some worker) before timing
        cpu0 = {k: tree_cpu(p) for k, p in pids.items()} | {"loadgen": self_cpu()}
        t0 = time.perf_counter()
        await run(n, keep=True)
        wall = time.perf_counter() - t0
        cpu1 = {k: tree_cpu(p) for k, p in pids.items()} | {"loadgen": self_cpu()}
        for raw in raws:
            await raw.close()
    return {
        "requests": n, "errors": errors, "seconds": wall, "requests_per_s": n / wall,
        "p50_ms": 1e3 * pct(latencies, 0.5), "p99_ms": 1e3 * pct(latencies, 0.99),
        "cpu_ms_per_request": {k: 1e3 * (cpu1[k] - cpu0[k]) / n for k in cpu0},
    }  # fmt: skip


def served_per_worker(metrics_dir: Path) -> list[int]:
    """Requests each worker served (from its own counter file), largest first."""
    from prometheus_client.multiprocess import MultiProcessCollector

    out = []
    for f in metrics_dir.glob("counter_*.db"):
        n = 0
        for metric in MultiProcessCollector._read_metrics([str(f)]).values():
            n += sum(int(s.value) for s in metric.samples if s.name == "cycleqd_router_requests_total")
        out.append(n)
    return sorted(out, reverse=True)


def one_router(tmp: Path, workers: int, args: argparse.Namespace, up_pid: int, tag: str) -> dict[str, Any]:
    port = free_port()
    metrics = tmp / f"metrics-{tag}"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PROMETHEUS_MULTIPROC_DIR=str(metrics))
    if workers == 1:
        env.pop("PROMETHEUS_MULTIPROC_DIR")  # the single-process path, exactly as users run it
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", "--policy", str(tmp / "policy.yaml"), "--port", str(port),
         "--workers", str(workers)],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:  # not select(): the test process may hold fds above 1024
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = sel.select(180)
        if not ready or "cycleqd-router on" not in proc.stdout.readline():
            raise RuntimeError(f"the router with {workers} workers did not start")
        wait_idle(proc.pid)  # each worker's start-up, and its classifier thread (no exemplars: it loads the encoder)
        body = {"model": "coder", "messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 8}
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        pids = {"router": proc.pid, "upstream": up_pid}
        warmup = 4 * args.concurrency
        res = asyncio.run(load(url, body, args.concurrency, args.requests, warmup, pids, args.client))
        res["workers"] = workers
        res["load_average_1min"] = os.getloadavg()[0]
        res["served_per_worker"] = served_per_worker(metrics) if workers > 1 else [args.requests + 4 * args.concurrency]
        return res
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--requests", type=int, default=4000, help="timed requests per router")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="each worker count measured this many times, alternating")
    ap.add_argument(
        "--client", choices=["raw", "httpx"], default="raw",
        help="load generator: raw asyncio HTTP/1.1 keep-alive connections (cheap), or an httpx.AsyncClient",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "workers.json")
    args = ap.parse_args()
    if 1 not in args.workers:
        ap.error("--workers must include 1 (the baseline)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    up = subprocess.Popen([sys.executable, "-c", UPSTREAM], stdout=subprocess.PIPE, text=True)
    try:
        upstream = f"http://127.0.0.1:{int(up.stdout.readline())}"  # type: ignore[union-attr]
        m = ServingManifest(run="bench", skills=["code", "os", "db"])
        m.engines.append(
            EngineEntry(id="e0", url=upstream, device="cpu", mode="full", base_model="-", health=Health.READY)
        )
        m.elites.append(
            EliteEntry(id="fake", engine_id="e0", served_model_name="fake", endpoint=f"{upstream}/v1", kind="full",
                       scores={"code": 0.9, "os": 0.9, "db": 0.9})
        )  # fmt: skip
        save_manifest(tmp / "manifest.json", m)
        policy = {"manifest": str(tmp / "manifest.json"), "cache_dir": str(tmp / "cache")}
        (tmp / "policy.yaml").write_text(yaml.safe_dump(policy))
        runs: list[dict[str, Any]] = []
        for rnd in range(args.rounds):
            for w in args.workers:
                r = one_router(tmp, w, args, up.pid, f"{rnd}-{w}")
                r["round"] = rnd
                runs.append(r)
                print(
                    f"round {rnd} workers {w}: {r['requests_per_s']:.0f} req/s, router "
                    f"{r['cpu_ms_per_request']['router']:.2f} CPU ms/req, served {r['served_per_worker']}",
                    flush=True,
                )
    finally:
        up.terminate()
        up.wait(30)
    rows = []
    for w in args.workers:
        mine = [r for r in runs if r["workers"] == w]
        ratio = [r["requests_per_s"] / b["requests_per_s"] for r in mine for b in runs
                 if b["workers"] == 1 and b["round"] == r["round"]]  # fmt: skip

        def med(key: str, sub: str | None = None, mine: list[dict[str, Any]] = mine) -> float:
            return statistics.median(r[key][sub] if sub else r[key] for r in mine)

        share = [statistics.median(r["served_per_worker"][i] / sum(r["served_per_worker"]) for r in mine)
                 for i in range(w) if all(len(r["served_per_worker"]) > i for r in mine)]  # fmt: skip
        rows.append({
            "workers": w, "requests_per_s": med("requests_per_s"), "vs_1_worker": statistics.median(ratio),
            "router_cpu_ms": med("cpu_ms_per_request", "router"),
            "upstream_cpu_ms": med("cpu_ms_per_request", "upstream"),
            "loadgen_cpu_ms": med("cpu_ms_per_request", "loadgen"), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
            "errors": sum(r["errors"] for r in mine), "share_per_worker": share,
        })  # fmt: skip
    base = next(r for r in rows if r["workers"] == 1)
    console = Console(width=170)
    table = Table(
        title=f"router workers against the fake upstream: {args.requests} requests at concurrency {args.concurrency}, "
        f"median of {args.rounds} rounds, {os.cpu_count()} cores"
    )
    for c in ("workers", "req/s", "vs 1 worker", "router CPU ms/req", "vs 1 worker ", "upstream CPU ms/req",
              "loadgen CPU ms/req", "p50 / p99 ms", "share per worker", "errors"):  # fmt: skip
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(
            str(r["workers"]), f"{r['requests_per_s']:.0f}", f"{r['vs_1_worker']:.2f}x", f"{r['router_cpu_ms']:.2f}",
            f"{r['router_cpu_ms'] / base['router_cpu_ms']:.2f}x", f"{r['upstream_cpu_ms']:.2f}",
            f"{r['loadgen_cpu_ms']:.2f}", f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}",
            " / ".join(f"{s:.0%}" for s in r["share_per_worker"]), str(r["errors"]),
        )  # fmt: skip
    console.print(table)
    console.print(
        f"The load generator and the fake upstream run on the same {os.cpu_count()} cores as the router's workers: "
        "on a 2-core machine 2 workers is the meaningful point (4 only add contention)."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(
        {"machine": platform.platform(), "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
         "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "runs": runs}, indent=2,
    ))  # fmt: skip
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
