"""``cycleqd-evolve finetune``: experts from any HF base, full or LoRA-merged, resumed exactly after a kill."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from evolve.cli import app
from evolve.evaluators import get_skill
from evolve.finetune import FinetuneConfig, checkpoint_dir, finetune
from evolve.models.train import encode

runner = CliRunner()


def small(**kw) -> FinetuneConfig:
    settings = {"steps": 6, "lr": 1e-3, "batch_size": 4, "warmup": 2, "train_items": 40, "checkpoint_every": 2}
    return FinetuneConfig(**{**settings, **kw})


@pytest.fixture()
def base_dir(tmp_path, tiny_model, tiny_tokenizer):
    d = tmp_path / "base"
    tiny_model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def weights(path):
    return load_file(path / "model.safetensors")


def test_expert_moves_from_the_base_and_lowers_its_loss(tmp_path, base_dir):
    meta = finetune(base_dir, ["db"], tmp_path / "db", small(steps=12, checkpoint_every=0))
    assert meta["role"] == "expert" and meta["skill"] == "db" and meta["prompt_format"] == "raw"
    assert meta["tokens"] > 0 and meta["tokens_per_s"] > 0
    base, expert = weights(base_dir), weights(tmp_path / "db")
    assert base.keys() == expert.keys()
    assert any(not torch.equal(base[k], expert[k]) for k in base)
    assert not checkpoint_dir(tmp_path / "db").exists()  # removed once the expert is saved
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "db")  # plain transformers loads it
    assert model.config.architectures == ["LlamaForCausalLM"]
    # reused when the same base and config are asked for again
    again = finetune(base_dir, ["db"], tmp_path / "db", small(steps=12, checkpoint_every=0))
    assert again.get("reused") and again["config_hash"] == meta["config_hash"]


class Killed(Exception):
    pass


def test_a_killed_finetune_resumes_exactly(tmp_path, base_dir):
    cfg = small(steps=7, checkpoint_every=2)
    whole = finetune(base_dir, ["code"], tmp_path / "whole", cfg)

    def kill_at_5(step: int, loss: float) -> None:
        if step == 4:  # after the checkpoint of step 4, before the one of step 6
            raise Killed

    with pytest.raises(Killed):
        finetune(base_dir, ["code"], tmp_path / "resumed", cfg, on_step=kill_at_5)
    assert not (tmp_path / "resumed").exists()
    assert (checkpoint_dir(tmp_path / "resumed") / "checkpoint.safetensors").is_file()
    starts = []
    resumed = finetune(base_dir, ["code"], tmp_path / "resumed", cfg, on_start=starts.append)
    assert starts == [4]
    assert resumed["final_loss"] == whole["final_loss"]
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reuse_needs_the_same_data_trainer_and_base(tmp_path, base_dir, monkeypatch, caplog):
    """An output is reused only when retraining would give the same model; otherwise the log and cycleqd.json
    say why it was retrained."""
    import evolve.evaluators.base as evaluators_base
    import evolve.models.train as trainer

    cfg, out = small(checkpoint_every=0), tmp_path / "db"
    first = finetune(base_dir, ["db"], out, cfg)
    assert list(first["data_digests"]) == ["db", "replay:code", "replay:os"]
    assert first["trainer_version"] == trainer.TRAINER_VERSION and first["retrained_because"] is None
    assert json.loads((out / "cycleqd.json").read_text())["reuse_key"] == first["reuse_key"]
    before = weights(out)
    assert finetune(base_dir, ["db"], out, cfg).get("reused")  # unchanged inputs

    split = {"train": 0.5, "calibration": 0.2, "validation": 0.15, "test": 0.15}  # train items change
    with monkeypatch.context() as m:
        m.setattr(evaluators_base, "SPLIT_FRACTIONS", split)
        changed = finetune(base_dir, ["db"], out, cfg)
    assert not changed.get("reused") and changed["config_hash"] == first["config_hash"]
    assert changed["retrained_because"] == "its training data changed (db, replay:code, replay:os)"
    assert f"retraining {out}: its training data changed" in caplog.text
    after = weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained on other items

    monkeypatch.setattr(trainer, "TRAINER_VERSION", trainer.TRAINER_VERSION + 1)
    bumped = finetune(base_dir, ["db"], out, cfg)
    assert not bumped.get("reused")
    assert bumped["retrained_because"].startswith(
        f"the trainer changed (TRAINER_VERSION {trainer.TRAINER_VERSION - 1} -> {trainer.TRAINER_VERSION})"
    )
    assert bumped["data_digests"] == first["data_digests"]  # the real split again
    assert finetune(base_dir, ["db"], out, cfg).get("reused")

    tensors = weights(base_dir)  # the base rewritten at the same path
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name] + 0.01}, base_dir / "model.safetensors", metadata={"format": "pt"})
    rebased = finetune(base_dir, ["db"], out, cfg)
    assert rebased["retrained_because"] == "its base model changed"
    assert finetune(base_dir, ["db"], out, small(checkpoint_every=0, steps=5))["retrained_because"] == (
        "its config changed"
    )


def test_a_checkpoint_of_other_training_data_is_not_resumed(tmp_path, base_dir, monkeypatch):
    import evolve.evaluators.base as evaluators_base

    cfg, out = small(steps=7, checkpoint_every=2), tmp_path / "code"

    def kill_at_5(step: int, loss: float) -> None:
        if step == 4:
            raise Killed

    split = {"train": 0.5, "calibration": 0.2, "validation": 0.15, "test": 0.15}
    with monkeypatch.context() as m, pytest.raises(Killed):
        m.setattr(evaluators_base, "SPLIT_FRACTIONS", split)
        finetune(base_dir, ["code"], out, cfg, on_step=kill_at_5)
    assert (checkpoint_dir(out) / "checkpoint.safetensors").is_file()
    starts = []
    finetune(base_dir, ["code"], out, cfg, on_start=starts.append)
    assert starts == [0]  # trained afresh on today's split, not resumed from the other one


def test_lora_merged_and_multitask(tmp_path, base_dir):
    meta = finetune(base_dir, ["os"], tmp_path / "lora", small(mode="lora", lora_rank=4))
    base, merged = weights(base_dir), weights(tmp_path / "lora")
    assert base.keys() == merged.keys()  # adapters merged away: an ordinary model
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("norm" not in k for k in changed)  # only linear layers carry LoRA deltas
    assert meta["role"] == "expert"
    multi = finetune(base_dir, ["code", "os", "db"], tmp_path / "multi", small(checkpoint_every=0))
    assert multi["role"] == "multitask" and multi["skills"] == ["code", "os", "db"]


def test_bf16_base_stays_bf16_and_autocast_trains(tmp_path, tiny_model, tiny_tokenizer):
    d = tmp_path / "bf16"
    tiny_model.to(torch.bfloat16).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    meta = finetune(d, ["os"], tmp_path / "out", small(autocast="bfloat16", checkpoint_every=0))
    assert meta["saved_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in weights(tmp_path / "out").values())


def test_chat_format_puts_the_prompt_in_the_template(tiny_tokenizer):
    items = get_skill("db").items("train", 2)
    raw = encode(tiny_tokenizer, items, prompt_format="raw")
    tok = tiny_tokenizer
    chat = encode(tok, items, prompt_format="chat")
    for (ids, n), (cids, cn), item in zip(raw, chat, items, strict=True):
        assert tok.decode(ids[n:], skip_special_tokens=True).strip() == item.answer
        assert tok.decode(cids[cn:], skip_special_tokens=True).strip() == item.answer
        assert item.prompt in tok.decode(cids[:cn])


def test_cli_bad_input_exits_2(tmp_path, base_dir):
    out = runner.invoke(app, ["finetune", "--base", str(base_dir), "--skill", "chess", "--out", str(tmp_path / "o")])
    assert out.exit_code == 2 and "unknown skill 'chess'" in " ".join(out.output.split())
    (tmp_path / "nothing").mkdir()
    out = runner.invoke(
        app, ["finetune", "--base", str(tmp_path / "nothing"), "--skill", "db", "--out", str(tmp_path / "o")]
    )
    assert out.exit_code == 2 and "config.json" in out.output
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    out = runner.invoke(app, ["finetune", "--base", str(base_dir), "--skill", "db", "--out", str(foreign)])
    assert out.exit_code == 2 and "not a model written by cycleqd-evolve" in " ".join(out.output.split())
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "o").exists()


def test_cli_trains_with_a_config_file(tmp_path, base_dir):
    (tmp_path / "ft.yaml").write_text("steps: 3\nbatch_size: 2\ntrain_items: 20\nwarmup: 1\nlr: 0.001\n")
    out = runner.invoke(
        app,
        [
            "finetune",
            "--base",
            str(base_dir),
            "--skill",
            "code",
            "--out",
            str(tmp_path / "e"),
            "--config",
            str(tmp_path / "ft.yaml"),
        ],
    )
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "e" / "cycleqd.json").read_text())["finetune"]["steps"] == 3
    # the output is not a terminal (as in a log): a plain line per tenth of the steps stands in for the live bar
    assert [ln.split(",")[0] for ln in out.output.splitlines() if "steps, loss" in ln] == ["1/3 steps", "2/3 steps",
                                                                                          "3/3 steps"]  # fmt: skip


@pytest.mark.slow
def test_two_tiny_experts_from_smollm2(smollm2_dir, tmp_path):
    """Two experts fine-tuned from the imported SmolLM2 for a few steps, chat format and bf16 autocast: each
    moves away from the base and loads back with plain transformers. (The lead's population support runs one
    generation of CycleQD on these.)"""
    cfg = FinetuneConfig(
        steps=3, lr=5e-5, batch_size=2, warmup=1, train_items=20, autocast="bfloat16", checkpoint_every=0, threads=2
    )
    base = load_file(smollm2_dir / "model.safetensors")
    for skill in ("code", "db"):
        meta = finetune(smollm2_dir, [skill], tmp_path / skill, cfg)
        assert meta["prompt_format"] == "chat" and meta["saved_dtype"] == "float32"
        assert meta["tokens_per_s"] > 0 and meta["final_loss"] < 20
        expert = load_file(tmp_path / skill / "model.safetensors")
        assert expert.keys() == base.keys()
        moved = [k for k in base if not torch.equal(base[k], expert[k])]
        assert len(moved) > len(base) // 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "db")
    assert model.config.tie_word_embeddings and model.num_parameters() == 134515008
    # ... and one generation of CycleQD over them (chat format, auto rank cap), as a user's population
    from evolve.run import Evolution
    from evolve.run_config import EvolveConfig

    cfg = EvolveConfig(
        population={"base": smollm2_dir, "experts": {s: tmp_path / s for s in ("code", "db")}},
        skills={s: {"kind": "world", "chat": True} for s in ("code", "db")},
        generations=1,
        children_per_generation=1,
        validation_items=2,
        test_items=2,
        bins=2,
        ranges={"code": (0.0, 1.0), "db": (0.0, 1.0)},
    )
    ev = Evolution(tmp_path / "run", cfg)
    assert cfg.rank_cap() == "auto" and not cfg.svd_embeddings()
    assert max(ev.bases.errors) > 0  # capped: about one model's size, not full rank
    ev.run()
    assert ev.state.generation == 1 and len(ev.state.elites) >= 2
