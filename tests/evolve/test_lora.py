"""Genomes exported as PEFT LoRA adapters: PEFT loads them, at full rank they reproduce the genome's projection
weights, and a lower rank costs a measured, larger truncation error."""

from __future__ import annotations

import json

import pytest
import torch

from evolve.genome import LAYER_INDEX, Bases
from evolve.lora import lora_factors, save_lora

peft = pytest.importorskip("peft", reason="peft is part of the dev extra")


@pytest.fixture()
def family(tiny_model):
    base = {k: v.detach().clone() for k, v in tiny_model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    experts = {s: {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for s in ("a", "b")}
    return base, Bases.compute(base, experts)


@pytest.mark.filterwarnings("ignore:Model has .tie_word_embeddings=True.:UserWarning")  # unmerged use only
def test_peft_loads_the_adapter_and_reproduces_the_genome(tmp_path, family, tiny_model, tiny_tokenizer):
    import copy

    from evolve.lora import merged_weights
    from evolve.models.modeling import save_model

    base, bases = family
    save_model(tiny_model, tiny_tokenizer, tmp_path / "base", {"role": "base"})
    genome = 0.7 * bases.layout.expert(0) + 0.4 * bases.layout.expert(1)
    full_rank = min(tiny_model.config.hidden_size, tiny_model.config.intermediate_size)
    export = save_lora(bases, genome, full_rank, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 * full_rank and config["lora_alpha"] == config["r"]
    assert {"embed_tokens", "lm_head"} <= set(config["target_modules"])
    # at full rank the adapter carries every matrix exactly (the tied embedding included); norms stay at the base
    want = bases.materialise(genome)
    merged = merged_weights(base, export)
    for name, w in want.items():
        if (LAYER_INDEX.search(name) and w.ndim == 2) or "embed_tokens" in name:
            assert torch.allclose(merged[name], w, atol=1e-5), name
        else:
            assert torch.equal(merged[name], base[name]), name
    untouched = sum(float(bases.delta(genome, n).pow(2).sum()) for n in want if "norm" in n)
    total = sum(float(bases.delta(genome, n).pow(2).sum()) for n in want)
    assert export.truncation_error == pytest.approx((untouched / total) ** 0.5, rel=1e-3)
    # PEFT reads the files as meant: its (unmerged) forward equals a model holding the merged weights
    reference = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(merged[name])
    peft_model = peft.PeftModel.from_pretrained(tiny_model, tmp_path / "adapter").eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4)


def test_lower_rank_costs_more_and_too_high_a_rank_is_refused(family, tiny_model):
    _, bases = family
    genome = bases.layout.expert(1)
    errors = [lora_factors(bases, genome, r).truncation_error for r in (1, 4, 16)]
    assert errors[0] > errors[1] > errors[2]
    with pytest.raises(ValueError, match="exceeds what"):
        lora_factors(bases, genome, 10_000)
