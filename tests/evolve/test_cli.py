"""The console script as a user runs it: help for every command, clean errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evolve", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


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
