from __future__ import annotations

import pytest
import torch

from evolve.merge import average, dare, task_arithmetic, ties

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


def test_dare_is_unbiased_and_seeded():
    big = {"w": torch.ones(200, 200)}
    base = {"w": torch.zeros(200, 200)}
    merged = dare(base, [big], drop=0.5, seed=1)["w"]
    assert set(torch.unique(merged).tolist()) == {0.0, 2.0}
    assert merged.mean().item() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(merged, dare(base, [big], drop=0.5, seed=1)["w"])
    assert torch.equal(dare(BASE, [A], drop=0.0)["w"], A["w"])
