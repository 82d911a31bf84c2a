"""The console script as a user runs it: help for every command, clean errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evolve", *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_help_lists_bootstrap():
    out = cli("--help")
    assert out.returncode == 0 and "bootstrap" in out.stdout
    out = cli("bootstrap", "--help")
    assert out.returncode == 0 and "--force" in out.stdout and "--config" in out.stdout


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [("skills: [code, chess]", "unknown skill 'chess'"), ("base: [", "not valid YAML")],
)
def test_bad_config_exits_2_with_the_reason(tmp_path, yaml_text, needle):
    (tmp_path / "c.yaml").write_text(yaml_text)
    out = cli("bootstrap", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"))
    assert out.returncode == 2
    assert needle in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "o").exists()


def test_foreign_out_dir_exits_2_and_is_untouched(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    out = cli("bootstrap", "--out", str(tmp_path))
    assert out.returncode == 2 and "not a bootstrap directory" in " ".join(out.stderr.split())
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_evaluate_missing_model_dir(tmp_path):
    out = cli("evaluate", "--model", str(tmp_path / "nope"))
    assert out.returncode == 2 and "no such model directory" in " ".join(out.stderr.split())


def test_evaluate_corrupt_model_names_the_file(tmp_path, tiny_model, tiny_tokenizer):
    from evolve.models.modeling import save_model

    save_model(tiny_model, tiny_tokenizer, tmp_path / "m", {"role": "base"})
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    out = cli("evaluate", "--model", str(tmp_path / "m"))
    assert out.returncode == 2 and "model.safetensors" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == b"garbage"  # reported, not replaced


def test_evaluate_scores_a_model(tmp_path, tiny_model, tiny_tokenizer):
    from evolve.models.modeling import save_model

    save_model(tiny_model, tiny_tokenizer, tmp_path / "m", {"role": "base"})
    out = cli("evaluate", "--model", str(tmp_path / "m"), "--limit", "5", "--skill", "db", "--skill", "os")
    assert out.returncode == 0, out.stderr
    assert "db" in out.stdout and "os" in out.stdout and "code" not in out.stdout.split("score")[-1]
    out = cli("evaluate", "--model", str(tmp_path / "m"), "--skill", "chess")
    assert out.returncode == 2 and "--skill 'chess': not configured" in out.stderr and "code, os, db" in out.stderr
