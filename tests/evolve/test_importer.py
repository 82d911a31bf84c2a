"""``cycleqd-evolve import``: HF directories and GGUF files in, clean HF directories out; bad input refused with
exit 2, a message naming the file, and nothing at ``--out`` touched."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from evolve.cli import app
from evolve.importer import ImportSourceError, import_model, resolve_source

runner = CliRunner()


def run_cli(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, " ".join((result.output + (result.stderr or "")).split())


@pytest.fixture()
def hf_dir(tmp_path, tiny_model, tiny_tokenizer):
    d = tmp_path / "src"
    tiny_model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture()
def previous_import(tmp_path, hf_dir):
    """An earlier import at --out: a failed import must leave it byte for byte as it was."""
    out = tmp_path / "out"
    import_model(str(hf_dir), out)
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


def test_hf_dir_imports_in_another_dtype_and_loads_with_plain_transformers(tmp_path, hf_dir, tiny_model):
    code, text = run_cli("import", str(hf_dir), "--out", str(tmp_path / "out"), "--dtype", "bfloat16")
    assert code == 0, text
    assert "max logit difference 0" in text
    out = tmp_path / "out"
    meta = json.loads((out / "cycleqd.json").read_text())
    assert meta["kind"] == "hf" and meta["saved_dtype"] == "bfloat16" and meta["max_logit_diff"] == 0.0
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    src = dict(tiny_model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, src[name].to(torch.bfloat16)), name
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template  # carried over
    # same source and dtype again: reused, not rewritten
    before = (out / "model.safetensors").stat().st_mtime_ns
    code, text = run_cli("import", str(hf_dir), "--out", str(out), "--dtype", "bfloat16")
    assert code == 0 and "already imported" in text
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_unreadable_gguf_exits_2_naming_it_and_keeps_the_old_output(tmp_path, previous_import):
    out, files = previous_import
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    code, text = run_cli("import", str(bad), "--out", str(out), "--force")
    assert code == 2
    assert str(bad) in text and "cannot" in text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_directory_without_tokenizer_exits_2(tmp_path, tiny_model):
    d = tmp_path / "notok"
    tiny_model.save_pretrained(d)
    code, text = run_cli("import", str(d), "--out", str(tmp_path / "out"))
    assert code == 2 and str(d) in text and "no tokenizer" in text
    assert not (tmp_path / "out").exists()


class _Tripwire:
    """Unpickling this creates a file: the test proves the checkpoint is never unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_only_checkpoint_is_refused_and_never_unpickled(tmp_path, tiny_model, tiny_tokenizer):
    d = tmp_path / "pickled"
    d.mkdir()
    tiny_model.config.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    marker = tmp_path / "unpickled"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))
    code, text = run_cli("import", str(d), "--out", str(tmp_path / "out"))
    assert code == 2 and str(d / "pytorch_model.bin") in text and "never unpickled" in text
    code, text = run_cli("import", str(d / "pytorch_model.bin"), "--out", str(tmp_path / "out"))
    assert code == 2 and "pickle" in text
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_foreign_out_dir_is_refused_untouched(tmp_path, hf_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    code, text = run_cli("import", str(hf_dir), "--out", str(out))
    assert code == 2 and "not an imported model" in text
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_unknown_package_and_missing_path_name_what_is_wrong():
    with pytest.raises(ImportSourceError, match="no_such_pkg_xyz: neither a file"):
        resolve_source("pkg:no_such_pkg_xyz")
    with pytest.raises(ImportSourceError, match=r"nowhere/model\.gguf: no such file"):
        resolve_source("nowhere/model.gguf")
    with pytest.raises(ImportSourceError, match=r"holds no \.gguf file"):
        resolve_source("pkg:evolve")  # an installed package without a GGUF


@pytest.mark.slow
def test_smollm2_from_its_wheel(smollm2_dir):
    """The bundled SmolLM2 GGUF becomes a dense Llama that plain transformers loads and that answers sensibly."""
    meta = json.loads((smollm2_dir / "cycleqd.json").read_text())
    assert meta["kind"] == "gguf" and meta["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert meta["architecture"] == "LlamaForCausalLM" and meta["tied_head"] and meta["chat_template"]
    assert 134e6 < meta["parameters"] < 135e6 and meta["max_logit_diff"] == 0.0
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3? Reply with the number only."}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "5" in tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_sharded_dir_imports_and_a_missing_shard_is_named(tmp_path, tiny_model, tiny_tokenizer):
    d = tmp_path / "sharded"
    tiny_model.save_pretrained(d, max_shard_size="20KB")
    tiny_tokenizer.save_pretrained(d)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    meta = import_model(str(d), tmp_path / "ok")
    assert meta["max_logit_diff"] == 0.0
    shards[-1].unlink()
    code, text = run_cli("import", str(d), "--out", str(tmp_path / "out"))
    assert code == 2 and str(shards[-1]) in text and "missing shard" in text
    assert not (tmp_path / "out").exists()
