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


def ties(
    base: StateDict, models: Sequence[StateDict], *, density: float = 0.2, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """TIES-merging (Yadav et al., 2023): trim each task vector to its top ``density`` share by magnitude,
    elect a sign per entry by the summed trimmed vectors, average only the entries that agree with it."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    out = {}
    for name, b in base.items():
        tvs = torch.stack([m[name].float() - b.float() for m in models])
        flat = tvs.reshape(len(models), -1)
        k = max(1, round(density * flat.shape[1]))
        thresh = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
        trimmed = torch.where(flat.abs() >= thresh, flat, torch.zeros_like(flat))
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[name] = (b.float() + scale * merged.reshape(b.shape)).to(b.dtype)
    return out


def dare(base: StateDict, models: Sequence[StateDict], *, drop: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    """DARE (Yu et al., 2024): drop each task-vector entry with probability ``drop``, rescale the rest by
    1 / (1 - drop), then take the plain average (task arithmetic with weights 1/n). Seeded, so reproducible."""
    if not 0 <= drop < 1:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    gen = torch.Generator().manual_seed(seed)
    sparse = []
    for m in models:
        sd = {}
        for name, b in base.items():
            tv = m[name].float() - b.float()
            keep = (torch.rand(tv.shape, generator=gen) >= drop).to(tv.device)  # drawn on the CPU: same masks anywhere
            sd[name] = b.float() + tv * keep / (1 - drop)
        sparse.append(sd)
    return average(base, sparse)
