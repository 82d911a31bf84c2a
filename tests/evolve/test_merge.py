from __future__ import annotations

import pytest
import torch

from evolve.merge import Ties, average, dare, task_arithmetic, ties

BASE = {"w": torch.zeros(2, 3)}
A = {"w": torch.tensor([[1.0, -2.0, 0.1], [0.0, 3.0, -0.2]])}
B = {"w": torch.tensor([[1.0, 2.0, -0.1], [4.0, -1.0, 0.3]])}


def test_task_arithmetic_and_average():
    assert torch.allclose(average(BASE, [A, B])["w"], (A["w"] + B["w"]) / 2)
    assert torch.allclose(task_arithmetic(BASE, [A], [2.0])["w"], 2 * A["w"])
    with pytest.raises(ValueError, match="one weight per model"):
        task_arithmetic(BASE, [A, B], [1.0])


def test_ties_trims_elects_and_averages_agreeing_entries():
    merged = ties(BASE, [A, B], density=0.5)["w"]
    # A keeps its top 3 by magnitude: -2, 3, 1 (tie with 1.0 kept at threshold); B keeps 4, 2, -1 ... see below
    assert merged[0, 0] == pytest.approx(1.0)  # both +1: mean of agreeing
    assert merged[1, 0] == pytest.approx(4.0)  # only B has it
    assert merged[0, 2] == 0.0 and merged[1, 2] == 0.0  # small entries trimmed away
    full = ties(BASE, [A, A], density=1.0)["w"]
    assert torch.allclose(full, A["w"])  # identical task vectors merge to themselves


def _ties_reference(base, models, density, scale):
    """TIES written out plainly (the k-th value per task vector, a sign election, the agreeing mean)."""
    out = {}
    for name, b in base.items():
        flat = torch.stack([m[name] - b for m in models]).reshape(len(models), -1)
        k = max(1, round(density * flat.shape[1]))
        thresh = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
        trimmed = torch.where(flat.abs() >= thresh, flat, torch.zeros_like(flat))
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[name] = b + scale * merged.reshape(b.shape)
    return out


def test_presorted_ties_gives_the_same_merges_at_every_setting():
    gen = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(8, 16, generator=gen), "b": torch.randn(5, generator=gen)}
    models = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    models[2]["a"][0, :4] = base["a"][0, :4] + 0.5  # equal magnitudes: ties at the threshold are all kept
    merger = Ties(base, models)
    for density, scale in [(0.2, 1.0), (0.05, 0.5), (0.5, 1.7), (1.0, 1.0), (0.33, 0.0)]:
        want = _ties_reference(base, models, density, scale)
        for got in (merger(density=density, scale=scale), ties(base, models, density=density, scale=scale)):
            for k in base:
                assert torch.allclose(got[k], want[k], atol=1e-6), (k, density, scale)
    with pytest.raises(ValueError, match="density"):
        merger(density=0.0)


def test_dare_is_unbiased_and_seeded():
    big = {"w": torch.ones(200, 200)}
    base = {"w": torch.zeros(200, 200)}
    merged = dare(base, [big], drop=0.5, seed=1)["w"]
    assert set(torch.unique(merged).tolist()) == {0.0, 2.0}
    assert merged.mean().item() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(merged, dare(base, [big], drop=0.5, seed=1)["w"])
    assert torch.equal(dare(BASE, [A], drop=0.0)["w"], A["w"])
