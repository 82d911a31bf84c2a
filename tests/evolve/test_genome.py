"""Genomes over SVD bases: experts and the base are reproduced exactly, arithmetic on genomes is task
arithmetic on weights, rank caps report their error, and materialisation writes into an engine in place."""

from __future__ import annotations

import pytest
import torch

from evolve.engines.hf import TransformersEngine
from evolve.genome import Bases
from evolve.merge import METHODS, merge
from evolve.rundir import BasisError, load_bases, save_bases

SKILLS = ["code", "os", "db"]


@pytest.fixture()
def family(tiny_model):
    """A base and three 'experts': the base plus a different low-amplitude perturbation each."""
    base = {k: v.detach().clone() for k, v in tiny_model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    experts = {s: {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for s in SKILLS}
    return base, experts


def _close(a, b, tol=1e-5):
    return all(torch.allclose(a[k], b[k], atol=tol, rtol=0) for k in a)


def test_expert_and_base_genomes_reproduce_their_weights(family):
    base, experts = family
    bases = Bases.compute(base, experts)
    assert max(bases.errors) < 1e-5
    for q, s in enumerate(SKILLS):
        assert _close(bases.materialise(bases.layout.expert(q)), experts[s])
    assert _close(bases.materialise(bases.layout.base()), base, tol=0)


def test_genome_arithmetic_is_task_arithmetic(family):
    base, experts = family
    bases = Bases.compute(base, experts)
    g = 0.3 * bases.layout.expert(0) + 0.9 * bases.layout.expert(2)
    want = merge("task_arithmetic", base, [experts["code"], experts["db"]], weights=[0.3, 0.9])
    assert _close(bases.materialise(g), want)
    # a linear merge method's genome form is its merge of the weights
    for name, method in METHODS.items():
        if method.linear:
            params = {"weights": [0.3, 0.9]} if name == "task_arithmetic" else {}
            genome = method.merge_genomes([bases.layout.expert(0), bases.layout.expert(2)], params)
            weights = method.merge(base, [experts["code"], experts["db"]], params)
            assert _close(bases.materialise(genome), weights), name


def test_rank_cap_reports_its_error(family):
    base, experts = family
    errors = [max(Bases.compute(base, experts, rank_cap=r).errors) for r in (2, 8, None)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-5
    capped = Bases.compute(base, experts, rank_cap=2)
    assert capped.layout.size < Bases.compute(base, experts).layout.size


def test_layout_counts_one_coefficient_per_singular_value_or_vector(family):
    base, experts = family
    bases = Bases.compute(base, experts)
    want = sum(min(v.shape) if v.ndim == 2 else 1 for v in base.values()) * len(SKILLS)
    assert bases.layout.size == want
    assert int(bases.layout.mask(1).sum()) == want // 3
    assert int(bases.layout.mask(1, matrices_only=True).sum()) < want // 3


def test_materialise_into_an_engine_in_place(family, tiny_model, tiny_tokenizer, tiny_arch):
    from evolve.models.modeling import new_model

    base, experts = family
    bases = Bases.compute(base, experts)
    engine = TransformersEngine(tiny_model, tiny_tokenizer)
    pointers = {k: v.data_ptr() for k, v in engine.state_dict().items()}
    bases.materialise_into(bases.layout.expert(1), engine.state_dict())
    assert {k: v.data_ptr() for k, v in engine.state_dict().items()} == pointers
    reference = new_model(tiny_arch, tiny_tokenizer, seed=0)
    reference.load_state_dict(experts["os"], strict=False)
    prompts = ["List the files in /etc.\nAnswer:", "Return x plus 3.\nAnswer:"]
    want = TransformersEngine(reference, tiny_tokenizer).generate(prompts, max_new_tokens=8)
    assert engine.generate(prompts, max_new_tokens=8) == want


def test_wrong_genome_or_model_is_refused(family):
    base, experts = family
    bases = Bases.compute(base, experts)
    with pytest.raises(ValueError, match="genome has shape"):
        bases.materialise(torch.zeros(3))
    with pytest.raises(KeyError, match="lacks"):
        bases.materialise_into(bases.layout.base(), {})


def test_save_load_round_trip_and_corruption(tmp_path, family):
    base, experts = family
    bases = Bases.compute(base, experts, rank_cap=4)
    save_bases(tmp_path / "svd", bases)
    again = load_bases(tmp_path / "svd")
    assert again.experts == SKILLS and again.rank_cap == 4 and again.errors == bases.errors
    g = torch.rand(bases.layout.size)
    assert _close(again.materialise(g), bases.materialise(g), tol=0)
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in (tmp_path / "svd").iterdir())
    (tmp_path / "svd" / "os.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(BasisError, match=r"os\.safetensors"):
        load_bases(tmp_path / "svd")
    with pytest.raises(BasisError, match="holds no SVD bases"):
        load_bases(tmp_path)


def test_materialising_into_the_model_the_base_came_from_keeps_the_base(tiny_model):
    params = dict(tiny_model.named_parameters())
    base = {k: v.detach() for k, v in params.items()}  # views of the live model, as a caller may pass them
    snapshot = {k: v.clone() for k, v in base.items()}
    experts = {"a": {k: v + 0.05 for k, v in snapshot.items()}}
    bases = Bases.compute(base, experts)
    for _ in range(3):
        bases.materialise_into(bases.layout.expert(0), {k: p.data for k, p in params.items()})
    assert _close(bases.base, snapshot, tol=0)
    assert _close({k: p.data for k, p in params.items()}, experts["a"])
