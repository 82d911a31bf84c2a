"""Model merging on state dicts: one task-arithmetic core, W = W_base + sum_i w_i (W_i - W_base).

The plain average of experts is task arithmetic with equal weights 1/n. Later merge methods (TIES, DARE) and
CycleQD's crossover are the same core with the task vectors transformed first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]


def task_vector(model: StateDict, base: StateDict) -> dict[str, torch.Tensor]:
    return {k: model[k] - base[k] for k in base}


def task_arithmetic(base: StateDict, models: Sequence[StateDict], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``base + sum_i weights[i] * (models[i] - base)``, tensor by tensor, in float32."""
    if len(models) != len(weights) or not models:
        raise ValueError(f"need one weight per model, got {len(models)} models and {len(weights)} weights")
    out = {}
    for name, b in base.items():
        acc = b.float().clone()
        for m, w in zip(models, weights, strict=True):
            if m[name].shape != b.shape:
                raise ValueError(f"{name}: shape {tuple(m[name].shape)} differs from the base's {tuple(b.shape)}")
            acc.add_(m[name].float() - b.float(), alpha=float(w))
        out[name] = acc.to(b.dtype)
    return out


def average(base: StateDict, models: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """The plain average of ``models`` (task arithmetic with weights 1/n)."""
    return task_arithmetic(base, models, [1.0 / len(models)] * len(models))
