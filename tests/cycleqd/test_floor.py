"""The rest of the ``cycleqd`` floor: it stands alone (no torch, nothing of evolve/serve/router), the engine key and
the Bearer check, and ``UserError``, which every user-facing error is and every CLI ends with exit code 2 on."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest
import typer

from cycleqd.auth import (
    ENGINE_KEY_ENV,
    ENGINE_KEY_FILE_ENV,
    GENERATED_KEY_FILE,
    bearer_token,
    engine_key,
    key_matches,
    new_engine_key,
)
from cycleqd.configfile import ConfigError
from cycleqd.errors import UserError


def test_the_floor_imports_nothing_of_the_components_and_no_torch():
    code = (
        "import sys, cycleqd.atomic, cycleqd.auth, cycleqd.configfile, cycleqd.errors\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('evolve', 'serve', 'router', 'torch', 'numpy'))\n"
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr


def test_the_engine_key_from_the_variable_or_the_file_it_names(tmp_path, monkeypatch):
    monkeypatch.delenv(ENGINE_KEY_ENV, raising=False)
    monkeypatch.delenv(ENGINE_KEY_FILE_ENV, raising=False)
    assert engine_key() is None
    (tmp_path / "key").write_text(" from-file \n")
    monkeypatch.setenv(ENGINE_KEY_FILE_ENV, str(tmp_path / "key"))
    assert engine_key() == "from-file"
    monkeypatch.setenv(ENGINE_KEY_ENV, " from-env ")  # the variable wins
    assert engine_key() == "from-env"
    monkeypatch.delenv(ENGINE_KEY_ENV)
    monkeypatch.setenv(ENGINE_KEY_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=f"{ENGINE_KEY_FILE_ENV}=.*missing: cannot read"):
        engine_key()
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv(ENGINE_KEY_FILE_ENV, str(tmp_path / "empty"))
    with pytest.raises(LookupError, match="the file is empty"):  # the caller's own error class
        engine_key(LookupError)


def test_a_generated_key_is_private_from_the_start_and_new_each_time(tmp_path):
    first = new_engine_key(tmp_path / "out")
    path = tmp_path / "out" / GENERATED_KEY_FILE
    assert path.read_text() == first + "\n" and len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert new_engine_key(tmp_path / "out") != first
    assert sorted(p.name for p in path.parent.iterdir()) == [GENERATED_KEY_FILE]


def test_the_bearer_check():
    assert bearer_token("Bearer  k1 ") == b"k1" and bearer_token("") == b"" and bearer_token("k2") == b"k2"
    keys = [b"k1", b"k2"]
    assert key_matches(b"k2", keys) and key_matches(b"k1", keys)
    assert not key_matches(b"k3", keys) and not key_matches(b"", keys) and not key_matches(b"k1", [])
    assert not key_matches(b"k", keys) and not key_matches(b"k1k1", keys)  # no prefix, no extension


def test_every_user_facing_error_is_a_user_error_and_keeps_its_base():
    from evolve.bootstrap import BootstrapError
    from evolve.evaluators import EvaluatorError, UnknownSkillError
    from evolve.finetune import FinetuneError
    from evolve.importer import ImportSourceError
    from evolve.merge_search import MergeSearchError
    from evolve.models.hf import ModelError
    from evolve.models.train import CheckpointError
    from evolve.rundir import BasisError, RunError
    from serve.manifest import ManifestError
    from serve.materialise import MaterialiseError
    from serve.plan import PlanError
    from serve.preflight import ServeError

    bases = {
        ConfigError: ValueError, RunError: RuntimeError, EvaluatorError: ValueError, BasisError: Exception,
        ModelError: Exception, BootstrapError: RuntimeError, UnknownSkillError: ValueError,
        FinetuneError: RuntimeError, ImportSourceError: ValueError, MergeSearchError: RuntimeError,
        CheckpointError: RuntimeError, ServeError: RuntimeError, ManifestError: RuntimeError,
        MaterialiseError: ValueError, PlanError: ValueError,
    }  # fmt: skip
    for cls, base in bases.items():
        assert issubclass(cls, UserError) and issubclass(cls, base), cls
        with pytest.raises(base):  # `except ValueError` and the like still catch it
            raise cls("x")


@pytest.mark.parametrize("cli", ["evolve.cli", "serve.cli", "router.cli"])
def test_every_cli_ends_on_a_user_error_with_exit_code_2(cli, capsys):
    import importlib

    from evolve.importer import ImportSourceError

    user_errors = importlib.import_module(cli).user_errors
    with pytest.raises(typer.Exit) as done, user_errors():
        raise ImportSourceError("model.gguf: not a GGUF file [or anything]")
    assert done.value.exit_code == 2
    assert "model.gguf: not a GGUF file [or anything]" in capsys.readouterr().err
    with pytest.raises(KeyError), user_errors():  # a bug keeps its traceback
        raise KeyError("bug")
