"""What lets a restarted engine come back on a busy CPU, with stand-in engines (no vLLM).

An engine starts at ``startup_nice`` (every process and thread it starts inherits it, and its session's autogroup
gets it too) and goes back to 0 once it answers; a restart that never answers is stopped after
``readiness_timeout_s`` and counted, up to ``failed``; engines sharing the CPU get disjoint cores for their OpenMP
threads. Real engines restarting under load: ``test_chaos.py`` (slow).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from serve.config import Device, ServeConfig
from serve.engine import Engine, cpu_shares
from serve.manifest import Health, ServingManifest
from serve.plan import EnginePlan
from serve.supervisor import Supervisor
from tests.router.conftest import free_port

# Stands in for a vLLM server: starts a child (vLLM's EngineCore) and a thread, records the nice each saw, then
# answers /health after a second.
SLOW_ENGINE = """
import os, subprocess, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, seen = int(sys.argv[1]), sys.argv[2]
child = subprocess.Popen([sys.executable, "-c", "import os, time; time.sleep(600)"])
threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
with open(seen, "w") as f:
    f.write(str(os.getpriority(os.PRIO_PROCESS, 0)))
time.sleep(1)
class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _engine(tmp_path: Path, port: int, command: list[str]) -> Engine:
    engine = Engine(EnginePlan("engine-0", Device(), port, "full", ["g1"], 1.0, 16), tmp_path / "m", api_key="k")
    engine.command = lambda cfg: command  # type: ignore[method-assign]
    return engine


def _group_nices(pgid: int) -> dict[int, int]:
    """Thread id -> nice of every thread of every process in the process group."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                out[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[16])
        except (OSError, ValueError):
            continue
    return out


def _autogroup_nice(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])
    except (OSError, ValueError):
        return None


@pytest.mark.skipif(os.geteuid() != 0, reason="a negative nice needs root or CAP_SYS_NICE")
def test_an_engine_starts_at_startup_nice_and_is_back_to_normal_once_it_answers(tmp_path):
    port, seen = free_port(), tmp_path / "nice"
    cfg = ServeConfig(out=tmp_path / "serve", port=port, admin_port=free_port(), startup_nice=-7)
    engine = _engine(tmp_path, port, [sys.executable, "-c", SLOW_ENGINE, str(port), str(seen)])
    sup = Supervisor(cfg, [engine], ServingManifest(run="x", skills=["code"]))
    try:
        engine.start(cfg)
        assert engine.boosted
        pgid = engine.proc.pid  # type: ignore[union-attr]
        if _autogroup_nice(pgid) is not None:
            assert _autogroup_nice(pgid) == -7
        deadline = time.monotonic() + 30
        while engine.health != Health.READY:
            assert time.monotonic() < deadline, engine.log_tail()
            nices = set(_group_nices(pgid).values())
            assert nices <= {-7}, nices  # while it starts: every process and thread at startup_nice
            sup.tick()
            time.sleep(0.1)
        assert seen.read_text() == "-7"
        nices = _group_nices(pgid)
        assert len(nices) >= 3 and set(nices.values()) == {0}, nices  # the child and the thread are back too
        assert _autogroup_nice(pgid) in (None, 0) and not engine.boosted
    finally:
        sup.shutdown()


def test_a_restart_that_never_answers_is_stopped_after_the_readiness_timeout_and_counted(tmp_path):
    port = free_port()
    cfg = ServeConfig(
        out=tmp_path / "serve", port=port, admin_port=free_port(), readiness_timeout_s=1.0, startup_nice=0,
        restart={"max_restarts": 2, "backoff_s": 0.0},
    )  # fmt: skip
    engine = _engine(tmp_path, port, [sys.executable, "-c", "import time; time.sleep(600)"])
    engine.health = Health.RESTARTING  # as after a crash: the next tick starts it
    sup = Supervisor(cfg, [engine], ServingManifest(run="x", skills=["code"]))
    seen: list[tuple[Health, int]] = []
    pids = set()
    try:
        deadline = time.monotonic() + 30
        while engine.health != Health.FAILED:
            assert time.monotonic() < deadline, seen
            sup.tick()
            if engine.proc is not None:
                pids.add(engine.proc.pid)
            if not seen or seen[-1] != (engine.health, engine.restarts):
                seen.append((engine.health, engine.restarts))
            time.sleep(0.1)
        manifest = (tmp_path / "serve" / "manifest.json").read_text()
    finally:
        sup.shutdown()
    # started, never ready, stopped and restarted once more, then failed: not "starting" for ever
    assert [h for h, _ in seen] == [Health.STARTING, Health.RESTARTING, Health.STARTING, Health.FAILED], seen
    assert engine.restarts == 2 and len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # each start's process group is gone
    assert engine.log.read_text().count("not ready 1 s after its start (readiness_timeout_s)") == 2
    assert '"health": "failed"' in manifest and '"restarts": 2' in manifest


def test_startup_nice_is_validated():
    with pytest.raises(ValueError):
        ServeConfig(startup_nice=-21)
    assert ServeConfig().startup_nice == -10


def test_an_unprivileged_start_says_it_runs_at_normal_priority(tmp_path, monkeypatch):
    """Without the right to a negative nice the engine still starts, at 0, and its log says why."""
    port = free_port()
    cfg = ServeConfig(out=tmp_path / "serve", port=port, admin_port=free_port())
    engine = _engine(tmp_path, port, [sys.executable, "-c", "import time; time.sleep(600)"])
    engine.log = tmp_path / "engine-0.log"
    monkeypatch.setattr("serve.engine._engine_child", lambda nice: lambda: None)  # the child's setpriority fails
    monkeypatch.setattr("serve.engine.set_autogroup_nice", lambda pid, nice: False)
    try:
        engine.start(cfg)
        assert not engine.boosted and engine.alive()
        assert "startup_nice -10 not applied (needs root or CAP_SYS_NICE)" in engine.log.read_text()
    finally:
        engine.stop(timeout=5)


def test_engines_on_the_cpu_get_disjoint_cores_for_their_openmp_threads(tmp_path, monkeypatch):
    assert cpu_shares(2, [0, 1]) == ["0", "1"]
    assert cpu_shares(2, [0, 1, 2, 3, 4]) == ["0,1", "2,3,4"]
    assert cpu_shares(1, [0, 1]) == [None]  # alone: vLLM's own binding
    assert cpu_shares(3, [0, 1]) == [None, None, None]  # more engines than cores: no sharing scheme helps
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr("serve.engine.os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    cfg = ServeConfig(out=tmp_path / "serve", replicas=2)
    engines = [
        Engine(EnginePlan(f"engine-{i}", Device(), 8100 + i, "full", ["g1"], 1.0, 16), tmp_path / "m", api_key="k")
        for i in range(2)
    ]
    Supervisor(cfg, engines, ServingManifest(run="x", skills=["code"]))
    assert [e.env(cfg)["VLLM_CPU_OMP_THREADS_BIND"] for e in engines] == ["0,1", "2,3"]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the operator's setting wins
    assert [e.env(cfg)["VLLM_CPU_OMP_THREADS_BIND"] for e in engines] == ["nobind", "nobind"]
