"""CycleQD's operators on genomes; defaults follow the official code (SakanaAI/CycleQD).

- crossover: model-wise linear merge, weights w_i ~ N(1 + mu, sigma) normalised by their sum (mu 0, sigma 0.01);
  on genomes this is exactly the merge of the parents' task vectors.
- mutation: SVD-uniform adds U diag(r * S) V^T of the quality skill's expert task vector per matrix, with
  r ~ U[0, rate) per singular value (rate 0.1), norms untouched; in genome terms, r is added to the quality
  expert's matrix coefficients. Gaussian mutation (std 3e-4) perturbs weights with isotropic noise in the
  official code; noise outside the experts' bases is not representable by a genome, so here it is Gaussian
  noise of that std on every genome coefficient (a documented deviation: a different scale of perturbation).
- parent sampling: elite sampling (the official formula: each elite's quality and each of its cell indices is
  min-max mapped to [min_factor, min_factor + span], default [0.5, 1.3], and the probability is their product)
  or uniform.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from evolve.archive import Elite
from evolve.genome import Layout
from evolve.merge import get_method


class CrossoverConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mu: float = 0.0
    sigma: float = Field(0.01, ge=0)


class MutationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["svd_uniform", "gaussian", "none"] = "svd_uniform"
    rate: float = Field(0.1, ge=0, description="svd_uniform: r ~ U[0, rate)")
    std: float = Field(3e-4, ge=0, description="gaussian: std of the noise")


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["elite", "uniform"] = "elite"
    min_factor: float = Field(0.5, gt=0, description="elite sampling: the lowest factor")
    span: float = Field(0.8, ge=0, description="elite sampling: factors span [min_factor, min_factor + span]")


def crossover(
    parents: Sequence[torch.Tensor], cfg: CrossoverConfig, gen: torch.Generator
) -> tuple[torch.Tensor, list[float]]:
    """Normalised linear merge of the parents' genomes (task arithmetic); returns the child and the weights used."""
    w = torch.normal(1.0 + cfg.mu, cfg.sigma, size=(len(parents),), generator=gen)
    weights = (w / w.sum()).tolist()
    return get_method("task_arithmetic").merge_genomes(parents, weights=weights), weights


def mutate(
    genome: torch.Tensor, layout: Layout, quality_expert: int, cfg: MutationConfig, gen: torch.Generator
) -> torch.Tensor:
    if cfg.kind == "none":
        return genome.clone()
    if cfg.kind == "svd_uniform":
        mask = layout.mask(quality_expert, matrices_only=True)
        r = torch.rand(int(mask.sum()), generator=gen) * cfg.rate
        out = genome.clone()
        out[mask] += r
        return out
    return genome + torch.randn(genome.shape, generator=gen) * cfg.std


def _normalise(values: np.ndarray, min_factor: float, span: float) -> np.ndarray:
    lo, hi = values.min(), values.max()
    if lo == hi:
        return np.ones_like(values, dtype=float)
    return min_factor + (values - lo) * (span / (hi - lo))


def sample_parents(elites: Sequence[Elite], cfg: SamplingConfig, rng: np.random.Generator) -> tuple[Elite, Elite]:
    """Two distinct parents (the same one twice only when the archive holds a single elite)."""
    if not elites:
        raise ValueError("cannot sample parents from an empty archive")
    if len(elites) == 1:
        return elites[0], elites[0]
    if cfg.kind == "uniform":
        probs = np.full(len(elites), 1.0 / len(elites))
    else:
        probs = _normalise(np.array([e.quality for e in elites]), cfg.min_factor, cfg.span)
        cells = np.array([e.cell for e in elites], dtype=float)
        for i in range(cells.shape[1]):
            probs = probs * _normalise(cells[:, i], cfg.min_factor, cfg.span)
        probs = probs / probs.sum() if probs.sum() > 0 else np.full(len(elites), 1.0 / len(elites))
    a, b = rng.choice(len(elites), size=2, replace=False, p=probs)
    return elites[int(a)], elites[int(b)]
