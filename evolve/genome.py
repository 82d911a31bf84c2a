"""Genomes over the experts' SVD bases: how every model CycleQD creates is represented and materialised.

Per weight matrix W (see ARCHITECTURE.md, "Genomes"):

    W = W_base + sum over experts q of  U_q diag(g_q * S_q) V_q^T

where U_q S_q V_q^T is the SVD of expert q's task vector for W. Tensors without an SVD (norm weights, biases)
carry one coefficient per expert: W = W_base + sum_q g_q * (W_q - W_base). A genome is the flat vector of all
coefficients, laid out by :class:`Layout`; expert q is the genome with 1 on q's entries and 0 elsewhere, the
base model is all zeros. Crossover and mutation are arithmetic on these vectors.

Which tensors get SVD bases is decided by rule, not by one architecture's names (:func:`svd_tensors`): every
2-D weight inside the decoder layers (a name with a layer index), and the token embedding and output head when
asked for (a tied head is one tensor, so it is decomposed once). Everything else (norms, biases, an embedding left
out) carries one coefficient per expert.

Bases are computed once (in float32, on whatever device the weights are on: a GPU makes the SVDs fast) and record
the rank cap and the reconstruction error it causes per expert. This module is their maths only: a run stores them
in its directory's ``svd/`` as safetensors, never pickle (written and read by :mod:`evolve.rundir`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

#: A parameter name with a numeric component (``model.layers.3.``, ``transformer.h.3.``): inside a decoder layer.
LAYER_INDEX = re.compile(r"\.\d+\.")

RankCap = int | Literal["auto"] | None


def svd_tensors(
    shapes: Mapping[str, Sequence[int]], *, embeddings: bool, embedding_names: Collection[str] = ()
) -> set[str]:
    """The tensors that get SVD bases: 2-D weights inside decoder layers, plus ``embedding_names`` (the input
    embedding and an untied output head, as the model reports them) when ``embeddings`` is on."""
    out = set()
    for name, shape in shapes.items():
        if len(shape) != 2:
            continue
        if name in embedding_names:
            if embeddings:
                out.add(name)
        elif LAYER_INDEX.search(name):
            out.add(name)
    return out


def auto_rank(shape: Sequence[int], n_experts: int) -> int:
    """The rank that keeps the factors of all experts for one matrix about the matrix's own size:
    ``K * r * (m + n + 1) <= m * n`` (at least 1, at most full rank)."""
    m, n = shape
    return max(1, min(min(m, n), (m * n) // (n_experts * (m + n + 1))))


@dataclass(frozen=True)
class Segment:
    """Where one (tensor, expert) pair's coefficients live in the flat genome."""

    name: str
    expert: int
    start: int
    length: int  # the rank for a matrix, 1 for a vector


class Layout:
    """The flat genome's layout: for each tensor (sorted by name), for each expert, its coefficients."""

    def __init__(self, ranks: Mapping[str, Sequence[int | None]]) -> None:
        """``ranks[name][q]`` is expert q's rank for matrix ``name``, or None for a vector tensor."""
        self.segments: list[Segment] = []
        self.by_name: dict[str, list[Segment]] = {}
        self._vector = {name: all(r is None for r in rs) for name, rs in ranks.items()}
        pos = 0
        for name in sorted(ranks):
            for q, r in enumerate(ranks[name]):
                seg = Segment(name, q, pos, 1 if r is None else r)
                self.segments.append(seg)
                self.by_name.setdefault(name, []).append(seg)
                pos += seg.length
        self.size = pos
        self.n_experts = len(next(iter(ranks.values()))) if ranks else 0

    def expert(self, q: int) -> torch.Tensor:
        """The genome that materialises expert ``q`` (1 on its entries, 0 elsewhere)."""
        g = torch.zeros(self.size)
        for seg in self.segments:
            if seg.expert == q:
                g[seg.start : seg.start + seg.length] = 1.0
        return g

    def base(self) -> torch.Tensor:
        return torch.zeros(self.size)

    def mask(self, q: int, *, matrices_only: bool = False) -> torch.Tensor:
        """Boolean mask of expert ``q``'s entries (optionally only those of matrices, as SVD mutation uses)."""
        m = torch.zeros(self.size, dtype=torch.bool)
        for seg in self.segments:
            if seg.expert == q and not (matrices_only and self.is_vector(seg.name)):
                m[seg.start : seg.start + seg.length] = True
        return m

    def is_vector(self, name: str) -> bool:
        return self._vector[name]


class Bases:
    """SVD factors of every expert's task vector, plus the base weights they are relative to."""

    def __init__(
        self,
        experts: Sequence[str],
        base: Mapping[str, torch.Tensor],
        factors: Sequence[Mapping[str, torch.Tensor]],
        errors: Sequence[float],
        rank_cap: RankCap,
    ) -> None:
        self.experts = list(experts)
        self.base = dict(base)
        self.factors = [dict(f) for f in factors]  # per expert: "{name}.U/.S/.V" or "{name}.delta"
        self.errors = list(errors)
        self.rank_cap = rank_cap
        self.layout = Layout(
            {
                name: [None if f"{name}.delta" in f else int(f[f"{name}.S"].numel()) for f in self.factors]
                for name in self.base
            }
        )

    # -- building --------------------------------------------------------------------------------------------
    @classmethod
    def compute(
        cls,
        base: Mapping[str, torch.Tensor],
        experts: Mapping[str, Mapping[str, torch.Tensor]],
        *,
        rank_cap: RankCap = None,
        svd: Collection[str] | None = None,
        on_tensor: Callable[[str], None] | None = None,
    ) -> Bases:
        """SVD of each expert's task vector per matrix (float32; on the tensors' device).

        ``svd`` names the tensors that get SVD bases (default: every 2-D tensor; see :func:`svd_tensors` for the
        rule runs use); the others carry one coefficient per expert. ``rank_cap`` is an int, ``"auto"``
        (:func:`auto_rank`, per matrix) or None (full rank). ``errors[q]`` is the relative Frobenius error of
        expert q's task vector rebuilt from the (possibly rank-capped) factors: 0 up to float error without a cap.
        """
        factors, errors = [], []
        k = len(experts)
        for expert_sd in experts.values():
            f: dict[str, torch.Tensor] = {}
            err_num = err_den = 0.0
            for name, b in base.items():
                tv = expert_sd[name].to(b.device, torch.float32) - b.float()
                if tv.ndim == 2 and (svd is None or name in svd):
                    u, s, vh = torch.linalg.svd(tv, full_matrices=False)
                    cap = auto_rank(tv.shape, k) if rank_cap == "auto" else rank_cap
                    r = s.numel() if cap is None else min(cap, s.numel())
                    f[f"{name}.U"] = u[:, :r].contiguous()
                    f[f"{name}.S"] = s[:r].contiguous()
                    f[f"{name}.V"] = vh[:r].T.contiguous()
                    approx = (u[:, :r] * s[:r]) @ vh[:r]
                    err_num += float((tv - approx).pow(2).sum())
                else:
                    f[f"{name}.delta"] = tv.contiguous()
                err_den += float(tv.pow(2).sum())
                if on_tensor is not None:
                    on_tensor(name)
            factors.append(f)
            errors.append((err_num / err_den) ** 0.5 if err_den > 0 else 0.0)
        # A copy, never a view: materialising into the very model the base came from must not alter the base.
        return cls(list(experts), {k: v.detach().float().clone() for k, v in base.items()}, factors, errors, rank_cap)

    # -- placement -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(iter(self.base.values())).device

    def to(self, device: torch.device | str) -> Bases:
        """Move the base weights and every factor to ``device`` (in place; materialisation then runs there)."""
        device = torch.device(device)
        if self.base and self.device != device:
            self.base = {k: v.to(device) for k, v in self.base.items()}
            self.factors = [{k: v.to(device) for k, v in f.items()} for f in self.factors]
        return self

    # -- materialisation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def materialise_into(self, genome: torch.Tensor, params: Mapping[str, torch.Tensor]) -> None:
        """Write the genome's full weights into existing tensors ``params`` in place (no reallocation).

        Sums are formed in float32 on the bases' device and rounded once into tensors of another dtype (a bf16
        engine), so a bf16 elite is the float32 elite rounded, not a sum of rounded terms.
        """
        if genome.shape != (self.layout.size,):
            raise ValueError(f"genome has shape {tuple(genome.shape)}, the bases expect ({self.layout.size},)")
        missing = self.base.keys() - params.keys()
        if missing:
            raise KeyError(f"the model lacks {len(missing)} tensors of the bases, e.g. {sorted(missing)[0]!r}")
        pair = (genome.cpu(), genome.to(self.device))
        for name in self.layout.by_name:
            acc = params[name]
            if acc.dtype == torch.float32 and acc.device == self.device:
                acc.copy_(self.base[name])
                self._add_delta(acc, pair, name)
            else:
                tmp = self.base[name].clone()
                self._add_delta(tmp, pair, name)
                acc.copy_(tmp)

    def _add_delta(self, acc: torch.Tensor, genome: tuple[torch.Tensor, torch.Tensor], name: str) -> None:
        """``genome`` as (a CPU copy, to decide which terms are zero without a device sync; a copy on the
        bases' device, to compute with)."""
        host, dev = genome
        for seg in self.layout.by_name[name]:
            sl = slice(seg.start, seg.start + seg.length)
            f = self.factors[seg.expert]
            if seg.length == 1 and f"{name}.delta" in f:
                if host[seg.start] != 0.0:
                    acc.add_(f[f"{name}.delta"], alpha=float(host[seg.start]))
            elif bool(host[sl].any()):
                acc.addmm_(f[f"{name}.U"] * (dev[sl] * f[f"{name}.S"]), f[f"{name}.V"].T)

    def delta(self, genome: torch.Tensor, name: str) -> torch.Tensor:
        """The genome's task vector for one tensor (its weights minus the base's)."""
        acc = torch.zeros_like(self.base[name])
        self._add_delta(acc, (genome.cpu(), genome.to(self.device)), name)
        return acc

    def materialise(self, genome: torch.Tensor) -> dict[str, torch.Tensor]:
        """The genome's full weights as a new state dict."""
        out = {k: torch.empty_like(v) for k, v in self.base.items()}
        self.materialise_into(genome.to(self.device), out)
        return out
