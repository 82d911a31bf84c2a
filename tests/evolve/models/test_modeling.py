"""Model directories: save -> load is bit-exact, and every way a directory can be broken is named."""

from __future__ import annotations

import json

import pytest
import torch

from evolve.models.modeling import ModelError, load_model, save_model


def test_save_load_is_bit_exact(tmp_path, tiny_model, tiny_tokenizer):
    save_model(tiny_model, tiny_tokenizer, tmp_path / "m", {"role": "base"})
    model, tok = load_model(tmp_path / "m")
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert tok.get_vocab() == tiny_tokenizer.get_vocab()
    assert tok("Return x plus 3.\nAnswer:")["input_ids"] == tiny_tokenizer("Return x plus 3.\nAnswer:")["input_ids"]


def test_tokenizer_round_trips_answers_and_adds_bos(tiny_tokenizer):
    for text in ["grep -c 'warn' /var/log/auth.log | wc -l", "SELECT name FROM employees WHERE dept = 'hr'"]:
        ids = tiny_tokenizer(text)["input_ids"]
        assert ids[0] == tiny_tokenizer.bos_token_id
        assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_renders_the_training_prompt(tiny_tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "List the files in /etc."}]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|bos|>List the files in /etc.\nAnswer:"


def test_saving_over_a_model_replaces_it_whole(tmp_path, tiny_model, tiny_tokenizer):
    save_model(tiny_model, tiny_tokenizer, tmp_path / "m", {"role": "base"})
    with torch.no_grad():
        next(tiny_model.parameters()).add_(1.0)
    save_model(tiny_model, tiny_tokenizer, tmp_path / "m", {"role": "expert"})
    model, _ = load_model(tmp_path / "m")
    assert torch.equal(next(model.parameters()), next(tiny_model.parameters()))
    assert json.loads((tmp_path / "m" / "cycleqd.json").read_text())["role"] == "expert"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary leftovers


def test_missing_directory(tmp_path):
    with pytest.raises(ModelError, match="no such model directory"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("victim", ["config.json", "model.safetensors", "tokenizer.json", "cycleqd.json"])
def test_missing_file_is_named(tmp_path, tiny_model, tiny_tokenizer, victim):
    save_model(tiny_model, tiny_tokenizer, tmp_path / "m", {"role": "base"})
    (tmp_path / "m" / victim).unlink()
    with pytest.raises(ModelError, match=victim.replace(".", r"\.")):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("victim", ["config.json", "model.safetensors", "tokenizer.json", "cycleqd.json"])
def test_corrupt_file_is_named(tmp_path, tiny_model, tiny_tokenizer, victim):
    save_model(tiny_model, tiny_tokenizer, tmp_path / "m", {"role": "base"})
    path = tmp_path / "m" / victim
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ModelError, match=victim.replace(".", r"\.")):
        load_model(tmp_path / "m")


def test_weights_of_another_shape_are_refused(tmp_path, tiny_model, tiny_tokenizer):
    save_model(tiny_model, tiny_tokenizer, tmp_path / "m", {"role": "base"})
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"model\.safetensors"):
        load_model(tmp_path / "m")
