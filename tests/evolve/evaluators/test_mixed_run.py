"""A run mixing kinds: the world's ``code``, a JSONL skill graded by SQL on a SQLite file and an lm-eval task from
local YAML. It completes, resumes after SIGKILL to the uninterrupted archive, and reports on test."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from rich.console import Console

from evolve.report import report
from evolve.run import Evolution
from evolve.rundir import STATE_FILE, RunState, archive_ids, genomes_equal
from tests.evolve.evaluators.data import lm_eval_task, shop_database, sql_jsonl
from tests.evolve.minis import mini_evolve_config
from tests.evolve.test_run import _generation

SKILLS = {"code": "code", "sql": "db", "shell": "os"}  # skill -> the mini expert trained for it


@pytest.fixture()
def mixed_config(tmp_path, mini_models, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    models = tmp_path / "models"
    (models / "experts").mkdir(parents=True)
    for d in ("base", "multitask"):
        (models / d).symlink_to(mini_models / d)
    for skill, expert in SKILLS.items():
        (models / "experts" / skill).symlink_to(mini_models / "experts" / expert)
    skills = {
        "code": {"kind": "world"},
        "sql": {"kind": "jsonl", "path": sql_jsonl(tmp_path / "sql.jsonl"), "grader": "sql",
                "database": shop_database(tmp_path / "shop.sqlite")},
        "shell": {"kind": "lm_eval", "task": "world_shell", "include_path": lm_eval_task(tmp_path / "tasks")},
    }  # fmt: skip
    return mini_evolve_config(models, skills=skills, ranges=dict.fromkeys(SKILLS, (0.0, 1.0)), generations=5)


@pytest.mark.slow
def test_a_run_mixing_kinds_completes_resumes_after_sigkill_and_reports_on_test(tmp_path, mixed_config, spawn):
    cfg = mixed_config
    reference = Evolution(tmp_path / "ref", cfg)
    reference.run()
    st = reference.state
    assert st.generation == 5 and set(st.archives) == set(SKILLS)
    assert all(set(e["validation"]) == set(SKILLS) for e in st.elites.values())
    # (the mini models are trained for a few steps and score ~0 everywhere; that each grader scores right answers
    # 1 is shown in test_jsonl / test_lm_eval / the world's tests)
    assert all(0.0 <= v <= 1.0 for e in st.elites.values() for v in e["validation"].values())

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "evolve", "run", "--out", str(run_dir), "--config", str(tmp_path / "cfg.yaml")]
    proc = spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1800  # a hang guard: the loop ends on generation 2
    while _generation(run_dir / STATE_FILE) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = _generation(run_dir / STATE_FILE)
    assert 2 <= stopped_at < 5, "the run must be killed part-way"
    subprocess.run([*cmd[:-2], "--resume"], check=True, stdout=subprocess.DEVNULL, timeout=1800)
    resumed = RunState.load(run_dir / STATE_FILE)
    assert archive_ids(resumed) == archive_ids(st)
    assert genomes_equal(resumed, st)

    result = report([run_dir], Console(quiet=True), elites="none")
    rows = result["rows"]
    assert set(rows["CycleQD best elite"]) == {*SKILLS, "mean"}
    for row in ("base", "expert:sql", "expert:shell", "CycleQD aggregate"):
        assert all(0.0 <= rows[row][s][0] <= 1.0 for s in SKILLS)
    assert json.loads((run_dir / "report.json").read_text())["split"] == "test"
