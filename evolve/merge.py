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
    return Ties(base, models, presort=False)(density=density, scale=scale)


class Ties:
    """TIES merges of fixed experts at many (density, scale) settings, as a merge-weight search asks for.

    The task vectors are taken once; with ``presort`` their magnitudes are also sorted once, so each merge reads
    its trim threshold instead of searching for it (the k-th value search was over half of every TIES merge of
    SmolLM2's 134.5M parameters: 6.7 of 12.5 s on 2 cores). The price is memory: the task vectors and, with
    ``presort``, their sorted magnitudes, each one float32 copy of every expert. The threshold is the same
    k-th largest magnitude either way, so both give identical merges.
    """

    def __init__(self, base: StateDict, models: Sequence[StateDict], *, presort: bool = True) -> None:
        if not models:
            raise ValueError("TIES needs at least one model")
        self.base = base
        # one row per model, flattened: the trim threshold is per model over the whole tensor
        self.vectors = {
            name: torch.stack([(m[name].float() - b.float()).flatten() for m in models]) for name, b in base.items()
        }
        self.sorted = {name: tv.abs().sort(dim=1).values for name, tv in self.vectors.items()} if presort else None

    def __call__(self, *, density: float = 0.2, scale: float = 1.0) -> dict[str, torch.Tensor]:
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        out = {}
        for name, b in self.base.items():
            flat = self.vectors[name]
            n = flat.shape[1]
            k = max(1, round(density * n))
            if self.sorted is not None:
                thresh = self.sorted[name][:, n - k : n - k + 1]
            else:
                thresh = flat.abs().kthvalue(n - k + 1, dim=1, keepdim=True).values
            trimmed = flat * (flat.abs() >= thresh)
            agree = trimmed * trimmed.sum(0).sign() > 0  # non-zero and of the elected sign
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
