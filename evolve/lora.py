"""Export a genome as a PEFT-format LoRA adapter over the base model (for multi-LoRA serving).

Which modules are adapted comes from the model, not from one architecture's names: every matrix with SVD bases
inside the decoder layers (their module names' last parts become ``target_modules``), and the token embedding and
output head when the run decomposed them (found through the model's own accessors, ``embedding_roles``).

Per matrix, the genome's task vector sum_q U_q diag(g_q * S_q) V_q^T is truncated to the top ``rank``
singular directions of each expert, which is exactly a LoRA of rank K * rank:

    B = [U_q[:, :r] * (g_q * S_q)[:r]  for q]   (out x K*r),   A = [V_q[:, :r]^T  for q]   (K*r x in)

with ``lora_alpha`` equal to the total rank, so that PEFT's scaling is 1. The (tied) token embedding carries
most of an elite's difference on a small vocabulary, so it is exported too: as an embedding LoRA on
``embed_tokens`` and, when the model ties its output layer to it, the same delta as a LoRA on ``lm_head`` (both
PEFT and vLLM apply the two separately); an untied head gets its own delta. Tensors with one coefficient per expert
(norms, biases, an embedding left out of the SVD) stay at the base. ``truncation_error`` is what
this costs in weight space: the relative Frobenius norm of the part of the task vector the adapter drops (the
serve stage measures the cost in scores).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from cycleqd.atomic import atomic_directory
from evolve.genome import LAYER_INDEX, Bases
from evolve.models.hf import EmbeddingRoles, embedding_roles


@dataclass(frozen=True)
class LoraExport:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A: r_total x in, B: out x r_total)
    rank: int  # total rank, K * per-expert rank
    truncation_error: float


def _adapted(bases: Bases, name: str, roles: EmbeddingRoles | None) -> bool:
    """Whether the adapter carries tensor ``name``: a matrix with SVD bases in a decoder layer, or the embedding or
    head when ``roles`` names them."""
    module = name.removesuffix(".weight")
    embedding = roles is not None and module in (roles.input, roles.output)
    return not bases.layout.is_vector(name) and bool(LAYER_INDEX.search(name) or embedding)


def check_rank(bases: Bases, rank: int, roles: EmbeddingRoles | None = None) -> int:
    """Validate a per-expert ``rank`` from the factors' shapes alone (nothing is computed); return the adapter's
    total rank, K * ``rank``, or raise ValueError saying what the bases allow."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    # A matrix whose bases have fewer directions than ``rank`` (a GQA key projection, a capped basis) is padded
    # with zero directions: the adapter's rank is one number, and zeros change nothing. A rank above every
    # matrix's own adds only zeros, so it is refused.
    by_name = bases.layout.by_name
    allowed = max((seg.length for n, segs in by_name.items() if _adapted(bases, n, roles) for seg in segs), default=0)
    if rank > allowed:
        raise ValueError(f"LoRA rank {rank} exceeds what the bases allow ({allowed}); choose at most {allowed}")
    return rank * bases.layout.n_experts


def lora_factors(bases: Bases, genome: torch.Tensor, rank: int, roles: EmbeddingRoles | None = None) -> LoraExport:
    """The adapter's factors per module. Without ``roles`` only the decoder layers' matrices are adapted."""
    total_rank = check_rank(bases, rank, roles)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    total_sq = dropped_sq = 0.0
    for name, segs in bases.layout.by_name.items():
        full = bases.delta(genome, name)
        total_sq += float(full.pow(2).sum())
        if not _adapted(bases, name, roles):
            dropped_sq += float(full.pow(2).sum())
            continue
        a_parts, b_parts = [], []
        for seg in segs:
            f = bases.factors[seg.expert]
            r = min(rank, seg.length)
            g = genome[seg.start : seg.start + r].to(f[f"{name}.S"].device)
            u, v = f[f"{name}.U"], f[f"{name}.V"]
            b_parts.append(torch.nn.functional.pad(u[:, :r] * (g * f[f"{name}.S"][:r]), (0, rank - r)))
            a_parts.append(torch.nn.functional.pad(v[:, :r].T, (0, 0, 0, rank - r)))
        a, b = torch.cat(a_parts, 0).contiguous(), torch.cat(b_parts, 1).contiguous()
        factors[name.removesuffix(".weight")] = (a, b)
        dropped_sq += float((full - b @ a).pow(2).sum())
    error = (dropped_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0
    return LoraExport(factors, total_rank, error)


def merged_weights(base: dict[str, torch.Tensor], export: LoraExport) -> dict[str, torch.Tensor]:
    """The weights a LoRA engine computes with: the base plus B @ A on every adapted matrix (a tied head is
    the embedding's tensor, so it gets the embedding's delta, as the adapter gives it)."""
    out = dict(base)
    for module, (a, b) in export.factors.items():
        out[f"{module}.weight"] = base[f"{module}.weight"] + (b @ a).to(base[f"{module}.weight"].device)
    return out


def save_lora(bases: Bases, genome: torch.Tensor, rank: int, path: Path, *, base_model: str) -> LoraExport:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` at ``path`` (atomically: an adapter already
    there is replaced only once the new one is complete, and a failure leaves it, and no temporary, behind)."""
    roles = embedding_roles(Path(base_model))
    export = lora_factors(bases, genome, rank, roles)
    tensors = {}
    targets: set[str] = set()
    for module, (a, b) in export.factors.items():
        if module == roles.input:
            # PEFT's embedding LoRA: delta = (B_e @ A_e)^T with A_e (r x vocab), B_e (hidden x r).
            tensors[f"base_model.model.{module}.lora_embedding_A"] = b.T.contiguous()
            tensors[f"base_model.model.{module}.lora_embedding_B"] = a.T.contiguous()
            targets.add(module.split(".")[-1])
            if roles.tied and roles.output:  # the head computes with the embedding's matrix: the same delta
                tensors[f"base_model.model.{roles.output}.lora_A.weight"] = a
                tensors[f"base_model.model.{roles.output}.lora_B.weight"] = b
                targets.add(roles.output.split(".")[-1])
        else:
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
            targets.add(module.split(".")[-1])
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": export.rank,
        "lora_alpha": export.rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    with atomic_directory(Path(path)) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (tmp / "cycleqd-lora.json").write_text(
            json.dumps({"truncation_error": export.truncation_error, "rank_per_expert": rank})
        )
    return export
