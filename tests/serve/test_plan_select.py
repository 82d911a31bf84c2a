"""Selection rules, placement plans and the serve CLI's refusals: fast, no engine started."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evolve.rundir import RunError, load_run
from serve.config import Device, Selection, ServeConfig
from serve.manifest import ManifestError, ServingManifest, load_manifest, save_manifest
from serve.materialise import MaterialiseError, check_lora_rank, max_lora_rank
from serve.plan import GIB, ModelSize, PlanError, make_plan
from serve.select import AGGREGATE_ID, pareto_front, select


def test_pareto_front_keeps_exactly_the_non_dominated():
    scores = {
        "a": {"x": 0.9, "y": 0.1},
        "b": {"x": 0.1, "y": 0.9},
        "c": {"x": 0.5, "y": 0.5},
        "d": {"x": 0.4, "y": 0.4},  # dominated by c
        "e": {"x": 0.9, "y": 0.05},  # dominated by a
    }
    assert pareto_front(scores) == ["a", "b", "c"]


def test_selection_rules_combine_without_duplicates(mini_run):
    _, state, _ = load_run(mini_run)
    best = {s: a.stats.best_id for s, a in state.archives.items()}
    chosen = select(state, Selection(ids=["expert:os"], best_per_skill=True, aggregate=True, top=2))
    ids = [c.id for c in chosen]
    assert len(ids) == len(set(ids))
    assert ids[0] == "expert:os" and set(best.values()) <= set(ids) and AGGREGATE_ID in ids
    by_mean = sorted(state.elites, key=lambda e: -sum(state.elites[e]["validation"].values()))
    assert by_mean[0] in ids
    agg = next(c for c in chosen if c.id == AGGREGATE_ID)
    assert agg.scores is None and set(agg.lineage["aggregate_of"]) <= set(best.values())
    for c in chosen:
        if c.id != AGGREGATE_ID:
            assert c.scores == state.elites[c.id]["validation"] and c.selected_by


def test_selecting_an_elite_the_run_lacks_names_what_it_has(mini_run):
    _, state, _ = load_run(mini_run)
    with pytest.raises(RunError, match=r"no elite 'g99999c00'.*expert:code"):
        select(state, Selection(ids=["g99999c00"]))
    with pytest.raises(RunError, match="chose no elite"):
        select(state, Selection(best_per_skill=False))


def test_lora_rank_beyond_the_model_is_refused(mini_run):
    config, _, bases = load_run(mini_run)
    base = config.resolved_population().base
    assert check_lora_rank(bases, 4, base) == 12
    with pytest.raises(MaterialiseError, match="at most 32"):
        check_lora_rank(bases, 33, base)
    assert max_lora_rank(12) == 16 and max_lora_rank(96) == 128
    with pytest.raises(MaterialiseError, match="mode: full"):
        max_lora_rank(600)


SIZE = ModelSize(weights_bytes=GIB, lora_slot_bytes_per_rank=1000, adapter_bytes=10_000)


def test_full_mode_places_one_engine_per_elite_first_fit():
    cfg = ServeConfig(
        mode="full",
        devices=[Device(kind="cuda", index=0, memory_gib=10), Device(kind="cuda", index=1, memory_gib=10)],
        memory_utilization=1.0,
        engine_overhead_gib=1,
        kv_cache_gib=2,
    )  # 4 GiB an engine: two per GPU
    plan = make_plan(cfg, ["a", "b", "c", "d"], SIZE, max_lora_rank=None)
    assert [e.device.name for e in plan.engines] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert [e.port for e in plan.engines] == [8100, 8101, 8102, 8103]
    with pytest.raises(PlanError, match="at most 4 fit"):
        make_plan(cfg, list("abcde"), SIZE, max_lora_rank=None)


def test_lora_mode_runs_one_engine_per_device_and_refuses_what_does_not_fit():
    cfg = ServeConfig(devices=[Device(memory_gib=8), Device(kind="cuda", memory_gib=8)], memory_utilization=1.0)
    plan = make_plan(cfg, ["a", "b", "c"], SIZE, max_lora_rank=16)
    assert [e.elites for e in plan.engines] == [["a", "c"], ["b"]]
    assert plan.engine_of("c").id == "engine-0"
    small = cfg.model_copy(update={"devices": [Device(memory_gib=2)]})
    with pytest.raises(PlanError, match=r"needs .* GiB but cpu has 2.00 GiB"):
        make_plan(small, ["a"], SIZE, max_lora_rank=16)


def test_replicas_plan_several_engines_per_elite_set_and_count_their_memory():
    cfg = ServeConfig(
        mode="full",
        replicas=2,
        devices=[Device(kind="cuda", index=0, memory_gib=10), Device(kind="cuda", index=1, memory_gib=10)],
        memory_utilization=1.0,
        engine_overhead_gib=1,
        kv_cache_gib=2,
    )  # 4 GiB an engine: two per GPU
    plan = make_plan(cfg, ["a", "b"], SIZE, max_lora_rank=None)
    assert [(e.id, e.elites, e.port) for e in plan.engines] == [
        ("engine-0", ["a"], 8100), ("engine-0-r1", ["a"], 8101), ("engine-1", ["b"], 8102),
        ("engine-1-r1", ["b"], 8103),
    ]  # fmt: skip
    with pytest.raises(PlanError, match=r"6 full-weight engines .* at most 4 fit"):
        make_plan(cfg, list("abc"), SIZE, max_lora_rank=None)
    lora = ServeConfig(replicas=3, devices=[Device(memory_gib=10)], memory_utilization=1.0, engine_overhead_gib=1)
    plan = make_plan(lora, ["a", "b"], SIZE, max_lora_rank=16)
    assert [(e.id, e.elites) for e in plan.engines] == [
        ("engine-0", ["a", "b"]), ("engine-0-r1", ["a", "b"]), ("engine-0-r2", ["a", "b"])
    ]  # fmt: skip
    assert plan.engines[0].elites is not plan.engines[1].elites  # add_elite appends to one engine's list
    with pytest.raises(PlanError, match=r"4 multi-LoRA replicas need 12.00 GiB but cpu has 10.00"):
        make_plan(lora.model_copy(update={"replicas": 4}), ["a"], SIZE, max_lora_rank=16)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        ServeConfig(replicas=0)


def test_auto_mode_takes_full_weights_while_they_fit_and_lora_beyond():
    cfg = ServeConfig(
        mode="auto",
        devices=[Device(kind="cuda", index=0, memory_gib=10)],
        memory_utilization=1.0,
        engine_overhead_gib=1,
        kv_cache_gib=2,
    )  # 4 GiB a full-weight engine: two fit
    plan = make_plan(cfg, ["a", "b"], SIZE, max_lora_rank=16)
    assert plan.mode == "full" and [e.mode for e in plan.engines] == ["full", "full"]
    assert "full weights: 2 engines" in plan.reason
    plan = make_plan(cfg, list("abcd"), SIZE, max_lora_rank=16)
    assert plan.mode == "lora" and [e.elites for e in plan.engines] == [list("abcd")]
    assert plan.reason.startswith("multi-LoRA: 4 full-weight engines") and "do not fit" in plan.reason
    with pytest.raises(PlanError, match="LoRA cannot serve"):
        make_plan(cfg, list("abcd"), SIZE, max_lora_rank=None)


def test_model_size_comes_from_the_headers_in_the_served_dtype(mini_run):
    from serve.plan import model_size

    config, _, _ = load_run(mini_run)
    base = config.resolved_population().base
    from evolve.models.hf import load_hf

    n = sum(p.numel() for p in load_hf(base)[0].parameters())
    assert model_size(base, "float32", None).weights_bytes == 4 * n
    assert model_size(base, "bfloat16", None).weights_bytes == 2 * n
    assert model_size(base, "auto", None).weights_bytes == 4 * n  # the checkpoint is float32
    assert model_size(base, "bfloat16", 8).adapter_bytes == 8 * model_size(base, "bfloat16", 1).adapter_bytes


def test_manifest_round_trip_and_clear_errors(tmp_path):
    m = ServingManifest(run="r", skills=["code"])
    save_manifest(tmp_path / "manifest.json", m)
    assert load_manifest(tmp_path / "manifest.json").run == "r"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"bad.json: corrupt"):
        load_manifest(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text('{"format_version": 7}')
    with pytest.raises(ManifestError, match="'format_version' is 7"):
        load_manifest(tmp_path / "old.json")
    (tmp_path / "field.json").write_text('{"format_version": 1, "run": "r", "skills": "code", "elites": []}')
    with pytest.raises(ManifestError, match="field 'skills'"):
        load_manifest(tmp_path / "field.json")
    with pytest.raises(ManifestError, match="no serving manifest"):
        load_manifest(tmp_path / "missing.json")


def _serve(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")  # rich tables at full width, so names are not wrapped
    return subprocess.run([sys.executable, "-m", "serve", *args], capture_output=True, text=True, timeout=900, env=env)


def _config(tmp_path, **kw) -> str:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(kw))
    return str(path)


def test_plan_command_prints_the_plan_and_starts_nothing(tmp_path, mini_run):
    out = _serve("plan", "--config", _config(tmp_path, run=str(mini_run), out=str(tmp_path / "s"), lora_rank=4))
    assert out.returncode == 0, out.stderr
    assert "engine-0" in out.stdout and "best:code" in out.stdout
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lora_rank": 1000}, "exceeds what"),
        ({"select": {"ids": ["nope"]}}, "no elite 'nope'"),
        ({"mode": "full", "select": {"top": 50}, "devices": [{"memory_gib": 8}]}, "do not fit"),
        ({"python": str(Path(sys.base_prefix) / "bin" / "python3")}, "vLLM is not installed"),
        ({"bogus": 1}, "field 'bogus'"),
    ],
)
def test_bad_input_is_refused_before_anything_starts(tmp_path, mini_run, settings, message):
    settings = {"run": str(mini_run), "out": str(tmp_path / "s"), "lora_rank": 4, **settings}
    out = _serve("run", "--config", _config(tmp_path, **settings))
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert not (tmp_path / "s" / "manifest.json").exists() and not (tmp_path / "s" / "logs").exists()


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path, mini_run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = _config(tmp_path, run=str(mini_run), out=str(tmp_path / "s"), lora_rank=4, port=port, admin_port=port + 1)
        out = _serve("run", "--config", cfg)
    assert out.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in out.stderr
    assert not (tmp_path / "s").exists()


def test_a_missing_run_directory_is_refused(tmp_path):
    out = _serve("plan", "--run", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and "not a CycleQD run directory" in out.stderr


def test_materialise_command_writes_adapters_and_reports_their_measured_cost(tmp_path, mini_run):
    import json

    out = _serve("materialise", "--config", _config(tmp_path, run=str(mini_run), out=str(tmp_path / "s"), lora_rank=2))
    assert out.returncode == 0, out.stderr
    _, state, _ = load_run(mini_run)
    for skill, archive in state.archives.items():
        eid = archive.stats.best_id
        adapter = tmp_path / "s" / "adapters" / eid.replace(":", "-")
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 6
        assert eid in out.stdout and "->" in out.stdout, skill
