"""A miniature bootstrap end to end in seconds: the layout, the accuracy matrix, reuse, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from evolve.bootstrap import REPORT_FILE, BootstrapError, run_bootstrap
from evolve.models.modeling import load_model
from tests.evolve.minis import mini_bootstrap_config as mini_config

ROWS = [
    "base", "expert:code", "expert:os", "expert:db", "multitask",
    "average(all experts)", "average(code+os)", "average(code+db)", "average(os+db)",
]  # fmt: skip


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("boot") / "models"
    report = run_bootstrap(mini_config(), out, console=Console(quiet=True))
    return out, report


def test_layout_and_report(mini_run):
    out, report = mini_run
    assert json.loads((out / REPORT_FILE).read_text()) == report
    assert report["format_version"] == 1
    assert list(report["accuracy"]) == ROWS
    for row in report["accuracy"].values():
        assert set(row) == {"code", "os", "db", "mean"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
        assert row["mean"] == pytest.approx((row["code"] + row["os"] + row["db"]) / 3)
    retention = report["merge_retention"]
    assert set(retention) == {
        "code in code+os",
        "os in code+os",
        "code in code+db",
        "db in code+db",
        "os in os+db",
        "db in os+db",
    }
    acc = report["accuracy"]
    gain = acc["expert:os"]["os"] - acc["base"]["os"]
    if gain > 0:
        assert retention["os in os+db"] == pytest.approx((acc["average(os+db)"]["os"] - acc["base"]["os"]) / gain)
    for rel in report["models"].values():
        model, tok = load_model(out / rel)
        assert model.config.num_hidden_layers == 2 and len(tok) == model.config.vocab_size
    assert report["models"]["expert:os"] == "experts/os"
    metas = {r: json.loads((out / p / "cycleqd.json").read_text()) for r, p in report["models"].items()}
    assert metas["expert:db"]["skill"] == "db" and metas["multitask"]["train"]["steps"] == 3 * 3


def test_experts_are_short_fine_tunes_of_the_base(mini_run):
    out, _ = mini_run
    base, _ = load_model(out / "base")
    expert, _ = load_model(out / "experts" / "code")
    delta = max((expert.state_dict()[k] - v).abs().max().item() for k, v in base.state_dict().items())
    assert 0 < delta < 0.1  # a short, low-learning-rate fine-tune of the base, not a fresh model


def test_rerun_reuses_saved_models_and_force_retrains(mini_run):
    out, _ = mini_run
    stamp = (out / "base" / "model.safetensors").stat().st_mtime_ns
    report = run_bootstrap(mini_config(), out, console=Console(quiet=True))
    assert (out / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    assert "base" not in report["timings_s"]
    report = run_bootstrap(mini_config(), out, force=True, console=Console(quiet=True))
    assert (out / "base" / "model.safetensors").stat().st_mtime_ns != stamp
    assert "base" in report["timings_s"]


def test_a_changed_config_retrains(mini_run):
    out, _ = mini_run
    report = run_bootstrap(mini_config(seed=5), out, console=Console(quiet=True))
    assert {"base", "expert:code", "multitask"} <= set(report["timings_s"])


def test_same_seed_same_weights(tmp_path):
    run_bootstrap(mini_config(), tmp_path / "again", console=Console(quiet=True))
    run_bootstrap(mini_config(), tmp_path / "twice", console=Console(quiet=True))
    a, _ = load_model(tmp_path / "again" / "experts" / "db")
    b, _ = load_model(tmp_path / "twice" / "experts" / "db")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_foreign_output_directory_is_refused_and_untouched(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(BootstrapError, match="not a bootstrap directory"):
        run_bootstrap(mini_config(), tmp_path, console=Console(quiet=True))
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]
    assert (tmp_path / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("content", ["{not json", '{"format_version": 99}'])
def test_corrupt_or_foreign_report_is_refused_and_untouched(tmp_path, content):
    (tmp_path / REPORT_FILE).write_text(content)
    with pytest.raises(BootstrapError, match=REPORT_FILE):
        run_bootstrap(mini_config(), tmp_path, console=Console(quiet=True))
    assert (tmp_path / REPORT_FILE).read_text() == content


def test_a_corrupt_saved_model_is_reported_by_name(tmp_path):
    from evolve.models.modeling import ModelError

    run_bootstrap(mini_config(), tmp_path / "m", console=Console(quiet=True))
    weights = tmp_path / "m" / "experts" / "os" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match=r"experts/os/model\.safetensors"):
        run_bootstrap(mini_config(), tmp_path / "m", console=Console(quiet=True))
    assert (tmp_path / "m" / "bootstrap.json").is_file()  # the earlier report is kept


@pytest.fixture()
def unscored(monkeypatch):
    """Skip the accuracy matrix (most of a miniature bootstrap's time): these tests are about what is trained."""
    import evolve.bootstrap

    rows = dict.fromkeys(ROWS, dict.fromkeys(["code", "os", "db", "mean"], 0.0))
    monkeypatch.setattr(evolve.bootstrap, "accuracy_matrix", lambda *args: rows)


def test_reuse_is_keyed_on_the_training_data_and_the_trainer(tmp_path, monkeypatch, unscored):
    """A saved model is reused only when retraining would give the same one: unchanged inputs reuse everything; a
    changed train split (as when calibration was carved out of train) or a bumped TRAINER_VERSION retrains, and
    the log and cycleqd.json say why."""
    import io

    import evolve.evaluators.base as evaluators_base
    import evolve.models.train as trainer

    def run():
        log = io.StringIO()
        report = run_bootstrap(mini_config(), tmp_path, console=Console(file=log, width=300))
        return report, log.getvalue()

    roles = {"base", "expert:code", "expert:os", "expert:db", "multitask"}
    first, _ = run()
    assert roles <= set(first["timings_s"])
    prov = first["provenance"]
    assert list(prov["base"]["data_digests"]) == ["code", "os", "db"]
    assert list(prov["expert:db"]["data_digests"]) == ["db", "replay:code", "replay:os"]
    assert prov["expert:db"]["base_key"] == prov["base"]["reuse_key"]
    meta = json.loads((tmp_path / "experts" / "db" / "cycleqd.json").read_text())
    assert meta["trainer_version"] == trainer.TRAINER_VERSION and meta["retrained_because"] is None
    assert meta["data_digests"] == prov["expert:db"]["data_digests"]

    again, log = run()  # unchanged inputs: every model reused
    assert not roles & set(again["timings_s"]) and "retraining" not in log
    assert all(p["reused"] for p in again["provenance"].values())
    assert {r: p["reuse_key"] for r, p in again["provenance"].items()} == {r: p["reuse_key"] for r, p in prov.items()}

    stamp = (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns
    split = {"train": 0.5, "calibration": 0.2, "validation": 0.15, "test": 0.15}  # train items change, test kept
    with monkeypatch.context() as m:
        m.setattr(evaluators_base, "SPLIT_FRACTIONS", split)
        changed, log = run()
    assert roles <= set(changed["timings_s"])  # retrained, not reused
    assert (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns != stamp
    assert "retraining base: its training data changed (code, os, db)" in log
    assert "config changed" not in log
    assert changed["config_hash"] == first["config_hash"]
    base_meta = json.loads((tmp_path / "base" / "cycleqd.json").read_text())
    assert base_meta["retrained_because"] == "its training data changed (code, os, db); its tokenizer changed"
    assert base_meta["data_digests"] != prov["base"]["data_digests"]
    expert = changed["provenance"]["expert:os"]
    assert "its training data changed" in expert["retrained_because"]
    assert "its base model was retrained" in expert["retrained_because"]

    monkeypatch.setattr(trainer, "TRAINER_VERSION", trainer.TRAINER_VERSION + 1)
    bumped, log = run()  # back to the real split: the data is the first run's again, but the trainer is newer
    assert roles <= set(bumped["timings_s"])
    old, new = trainer.TRAINER_VERSION - 1, trainer.TRAINER_VERSION
    assert bumped["provenance"]["base"]["retrained_because"] == (
        f"the trainer changed (TRAINER_VERSION {old} -> {new}); its training data changed (code, os, db); "
        "its tokenizer changed"  # the saved base is the changed split's
    )
    assert bumped["provenance"]["base"]["data_digests"] == prov["base"]["data_digests"]
    assert "retraining multitask: the trainer changed" in log


def test_models_trained_before_digests_were_recorded_are_retrained(tmp_path, unscored):
    run_bootstrap(mini_config(), tmp_path, console=Console(quiet=True))
    path = tmp_path / "experts" / "code" / "cycleqd.json"
    meta = json.loads(path.read_text())
    for key in ("trainer_version", "data_digests", "base_key", "reuse_key"):
        del meta[key]  # what an older bootstrap wrote: only the config hash
    path.write_text(json.dumps(meta))
    report = run_bootstrap(mini_config(), tmp_path, console=Console(quiet=True))
    assert set(report["timings_s"]) & {"base", "expert:code", "expert:os"} == {"expert:code"}
    assert "trained before" in report["provenance"]["expert:code"]["retrained_because"]
