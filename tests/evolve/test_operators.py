from __future__ import annotations

import numpy as np
import pytest
import torch

from evolve.archive import Elite
from evolve.genome import Layout
from evolve.operators import (
    CrossoverConfig,
    MutationConfig,
    SamplingConfig,
    crossover,
    mutate,
    sample_parents,
)

LAYOUT = Layout({"w": [4, 4], "norm": [None, None]})  # expert 0: w (4), norm (1); expert 1: the same


def test_crossover_is_a_normalised_merge_near_the_mean():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    child, w = crossover([a, b], CrossoverConfig(), torch.Generator().manual_seed(0))
    assert sum(w) == pytest.approx(1.0) and all(abs(x - 0.5) < 0.05 for x in w)
    assert torch.allclose(child, torch.tensor(w))
    child2, w2 = crossover([a, b], CrossoverConfig(), torch.Generator().manual_seed(0))
    assert w2 == w and torch.equal(child, child2)


def test_svd_mutation_touches_only_the_quality_experts_matrices():
    g = torch.zeros(LAYOUT.size)
    out = mutate(g, LAYOUT, 1, MutationConfig(rate=0.1), torch.Generator().manual_seed(0))
    changed = out != 0
    assert torch.equal(changed, LAYOUT.mask(1, matrices_only=True))
    assert float(out.max()) < 0.1 and float(out.min()) >= 0.0


def test_gaussian_and_no_mutation():
    g = torch.ones(LAYOUT.size)
    noisy = mutate(g, LAYOUT, 0, MutationConfig(kind="gaussian", std=1e-3), torch.Generator().manual_seed(0))
    assert bool((noisy != g).all()) and float((noisy - g).abs().max()) < 1e-2
    assert torch.equal(mutate(g, LAYOUT, 0, MutationConfig(kind="none"), torch.Generator()), g)


def _elites():
    return [Elite(f"e{i}", (i, 0), q, {}) for i, q in enumerate([0.1, 0.5, 0.9])]


def test_elite_sampling_favours_quality_and_high_cells():
    rng = np.random.default_rng(0)
    counts = {"e0": 0, "e1": 0, "e2": 0}
    for _ in range(2000):
        for p in sample_parents(_elites(), SamplingConfig(), rng):
            counts[p.id] += 1
    assert counts["e2"] > counts["e1"] > counts["e0"]


def test_uniform_sampling_and_distinct_parents():
    rng = np.random.default_rng(0)
    pairs = [sample_parents(_elites(), SamplingConfig(kind="uniform"), rng) for _ in range(300)]
    assert all(a.id != b.id for a, b in pairs)
    counts = {e: sum(e in (a.id, b.id) for a, b in pairs) for e in ("e0", "e1", "e2")}
    assert min(counts.values()) > 150
    single = [Elite("only", (0, 0), 0.5, {})]
    assert sample_parents(single, SamplingConfig(), rng) == (single[0], single[0])
    with pytest.raises(ValueError, match="empty archive"):
        sample_parents([], SamplingConfig(), rng)
