"""CycleQD runs: determinism, exact resume after SIGKILL, a results table, and refusal of bad run dirs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml
from rich.console import Console
from safetensors import safe_open

from evolve.report import report
from evolve.run import Evolution
from evolve.rundir import STATE_FILE, RunError, RunState, archive_ids, genomes_equal
from tests.evolve.minis import mini_evolve_config


def test_a_run_fills_archives_with_lineage(tmp_path, mini_models):
    ev = Evolution(tmp_path / "run", mini_evolve_config(mini_models))
    ev.run()
    st = RunState.load(tmp_path / "run" / STATE_FILE)
    assert st.generation == 6
    assert set(st.archives) == {"code", "os", "db"}
    assert all(len(a) >= 1 for a in st.archives.values())
    for eid in {e.id for a in st.archives.values() for e in a.elites()}:
        assert eid in st.genomes and eid in st.elites
        lineage = st.elites[eid]["lineage"]
        if not eid.startswith("expert:"):
            assert lineage["quality"] == ["code", "os", "db"][lineage["generation"] % 3]
            assert all(p in st.elites or p.startswith("g") for p in lineage["parents"])
    assert [ev.quality_skill(t) for t in range(4)] == ["code", "os", "db", "code"]


def test_same_seed_same_archive(tmp_path, mini_models):
    a = Evolution(tmp_path / "a", mini_evolve_config(mini_models))
    a.run()
    b = Evolution(tmp_path / "b", mini_evolve_config(mini_models))
    b.run()
    assert archive_ids(a.state) == archive_ids(b.state)
    assert genomes_equal(a.state, b.state)


def test_no_cycle_keeps_one_quality_skill(tmp_path, mini_models):
    ev = Evolution(tmp_path / "r", mini_evolve_config(mini_models, cycle=False, fixed_quality="db", generations=3))
    ev.run()
    assert {e["lineage"]["quality"] for e in ev.state.elites.values() if "quality" in e["lineage"]} <= {"db"}


def _generation(path) -> int:
    try:
        with safe_open(path, framework="pt") as f:
            return json.loads(f.metadata()["state"])["generation"]
    except Exception:
        return -1


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_resume_gives_the_uninterrupted_archive(tmp_path, mini_models, spawn):
    cfg = mini_evolve_config(mini_models, generations=10)
    reference = Evolution(tmp_path / "ref", cfg)
    reference.run()
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "evolve", "run", "--out", str(run_dir), "--config", str(tmp_path / "cfg.yaml")]
    rng = random.Random(os.getpid())
    target = rng.randint(1, 8)
    proc = spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1200  # a hang guard: the loop ends on the target generation
    while _generation(run_dir / STATE_FILE) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.random() * 0.5)  # somewhere inside the next generation (or its save)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = _generation(run_dir / STATE_FILE)
    assert 1 <= stopped_at <= 10
    out = subprocess.run([*cmd[:-2], "--resume"], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr
    # stdout is a pipe, not a terminal: one plain progress line per generation (a tenth of 10), from the resumed one
    logged = [int(ln.split("/")[0]) for ln in out.stdout.splitlines() if "/10 generations:" in ln]
    assert logged == list(range(stopped_at + 1, 11)), out.stdout
    resumed = RunState.load(run_dir / STATE_FILE)
    assert resumed.generation == 10
    assert archive_ids(resumed) == archive_ids(reference.state)
    assert genomes_equal(resumed, reference.state)


def test_report_table_on_test(tmp_path, mini_models):
    ev = Evolution(tmp_path / "r", mini_evolve_config(mini_models, generations=3))
    ev.run()
    result = report([tmp_path / "r", tmp_path / "r"], Console(quiet=True), out=tmp_path / "table")
    rows = result["rows"]
    assert list(rows) == [
        "base", "expert:code", "expert:os", "expert:db", "multitask", "task arithmetic (average)",
        "TIES", "DARE", "CycleQD best elite", "CycleQD aggregate",
    ]  # fmt: skip
    for cells in rows.values():
        assert set(cells) == {"code", "os", "db", "mean"}
        assert all(0 <= m <= 1 and s == 0 for m, s in cells.values())  # the same run twice: no spread
    assert (tmp_path / "table.md").read_text().startswith("| model |")
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["split"] == "test" and saved["generations"] == 3
    # every elite's test scores are stored in the run directory, and are the scores of its genome
    state = RunState.load(tmp_path / "r" / "state.safetensors")
    assert all(set(e["test"]) == {"code", "os", "db"} for e in state.elites.values())
    assert state.elites["expert:os"]["test"] == pytest.approx(
        {k: m for k, (m, _) in rows["expert:os"].items() if k != "mean"}
    )
    child = next((e for e in sorted(state.genomes) if not e.startswith("expert:")), "expert:db")
    again = Evolution(tmp_path / "r", mini_evolve_config(mini_models, generations=3), resume=True)
    assert again.score(state.genomes[child], "test") == state.elites[child]["test"]
    assert again.state.elites[child]["validation"] == state.elites[child]["validation"]


def test_report_scores_only_the_best_elites_when_asked(tmp_path, mini_models):
    """``elites="best"``: each archive's best and the best by mean validation get test scores, no other elite."""
    ev = Evolution(tmp_path / "r", mini_evolve_config(mini_models, generations=3))
    ev.run()
    report([tmp_path / "r"], Console(quiet=True), elites="best")
    state = RunState.load(tmp_path / "r" / STATE_FILE)
    scored = {e for e, v in state.elites.items() if "test" in v}
    best = {a.stats.best_id for a in state.archives.values()} | {ev.best_mean_elite()}
    assert scored == best and len(scored) < len(state.genomes)
    for eid in scored:
        assert ev.score(state.genomes[eid], "test") == state.elites[eid]["test"]


def test_existing_directory_needs_resume(tmp_path, mini_models):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("x")
    with pytest.raises(RunError, match="not empty"):
        Evolution(tmp_path / "r", mini_evolve_config(mini_models))
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["keep.txt"]
    with pytest.raises(RunError, match="no run to resume"):
        Evolution(tmp_path / "r", mini_evolve_config(mini_models), resume=True)


def test_corrupt_state_is_reported_and_kept(tmp_path, mini_models):
    cfg = mini_evolve_config(mini_models, generations=1)
    Evolution(tmp_path / "r", cfg).run()
    state = tmp_path / "r" / STATE_FILE
    state.write_bytes(b"junk")
    with pytest.raises(RunError, match=r"state\.safetensors"):
        Evolution(tmp_path / "r", cfg, resume=True)
    assert state.read_bytes() == b"junk"


def test_foreign_or_changed_run_config_is_refused(tmp_path, mini_models):
    cfg = mini_evolve_config(mini_models, generations=1)
    Evolution(tmp_path / "r", cfg).run()
    with pytest.raises(RunError, match="saved config differs"):
        Evolution(tmp_path / "r", mini_evolve_config(mini_models, generations=2, seed=3), resume=True)
    (tmp_path / "r" / "run.json").write_text('{"format_version": 7}')
    with pytest.raises(RunError, match="format_version"):
        Evolution(tmp_path / "r", cfg, resume=True)


def test_a_run_saved_without_a_newer_defaulted_setting_still_resumes(tmp_path, mini_models):
    cfg = mini_evolve_config(mini_models, generations=1)
    Evolution(tmp_path / "r", cfg).run()
    run_file = tmp_path / "r" / "run.json"
    data = json.loads(run_file.read_text())
    del data["config"]["engine"]  # as written before the setting existed
    run_file.write_text(json.dumps(data))
    ev = Evolution(tmp_path / "r", cfg, resume=True)
    assert ev.state.generation == 1


@pytest.mark.slow
def test_ablation_runs_every_variant_and_resumes(tmp_path, mini_models):
    from evolve.ablate import VARIANTS, ablate, variant_config

    cfg = mini_evolve_config(mini_models, generations=2)
    assert variant_config(cfg, {"cycle": False}).fixed_quality == "code"
    assert variant_config(cfg, {"mutation": {"kind": "gaussian"}}).mutation.rate == cfg.mutation.rate
    results = ablate(cfg, tmp_path / "abl", Console(quiet=True))
    assert list(results) == list(VARIANTS)
    for rows in results.values():
        assert set(rows) == {"CycleQD best elite", "CycleQD aggregate"}
    no_mut = RunState.load(tmp_path / "abl" / "wo-mutation" / STATE_FILE)
    assert {e["lineage"].get("mutation") for e in no_mut.elites.values()} <= {None, "none"}
    stamp = (tmp_path / "abl" / "cycleqd" / STATE_FILE).stat().st_mtime_ns
    again = ablate(cfg, tmp_path / "abl", Console(quiet=True))  # resumes: nothing left to evolve
    assert (tmp_path / "abl" / "cycleqd" / STATE_FILE).stat().st_mtime_ns == stamp
    assert again == results


def test_export_lora_cli(tmp_path, mini_models):
    import subprocess
    import sys

    Evolution(tmp_path / "r", mini_evolve_config(mini_models, generations=1)).run()
    base = [sys.executable, "-m", "evolve", "export-lora", "--run", str(tmp_path / "r")]
    out = subprocess.run(
        [*base, "--out", str(tmp_path / "a"), "--rank", "4"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file() and "truncation error" in out.stdout
    out = subprocess.run(
        [*base, "--out", str(tmp_path / "b"), "--elite", "nope"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 2 and "no elite 'nope'" in out.stderr and not (tmp_path / "b").exists()
    out = subprocess.run(
        [*base, "--out", str(tmp_path / "c"), "--rank", "999"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 2 and "exceeds what" in out.stderr and not (tmp_path / "c").exists()
