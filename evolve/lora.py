"""Export a genome as a PEFT-format LoRA adapter over the base model (for multi-LoRA serving).

Per matrix, the genome's task vector sum_q U_q diag(g_q * S_q) V_q^T is truncated to the top ``rank``
singular directions of each expert, which is exactly a LoRA of rank K * rank:

    B = [U_q[:, :r] * (g_q * S_q)[:r]  for q]   (out x K*r),   A = [V_q[:, :r]^T  for q]   (K*r x in)

with ``lora_alpha`` equal to the total rank, so that PEFT's scaling is 1. The (tied) token embedding carries
most of an elite's difference on a small vocabulary, so it is exported too: as an embedding LoRA on
``embed_tokens`` and, when the model ties its output layer to it, the same delta as a LoRA on ``lm_head`` (both
PEFT and vLLM apply the two separately). Only the norm weights stay at the base. ``truncation_error`` is what
this costs in weight space: the relative Frobenius norm of the part of the task vector the adapter drops (the
serve stage measures the cost in scores).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from evolve.genome import Bases

#: Llama projections that PEFT and vLLM accept as LoRA targets.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDING = "model.embed_tokens"


@dataclass(frozen=True)
class LoraExport:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A: r_total x in, B: out x r_total)
    rank: int  # total rank, K * per-expert rank
    truncation_error: float


def lora_factors(bases: Bases, genome: torch.Tensor, rank: int) -> LoraExport:
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    total_sq = dropped_sq = 0.0
    for name, segs in bases.layout.by_name.items():
        full = bases.delta(genome, name)
        total_sq += float(full.pow(2).sum())
        module = name.removesuffix(".weight")
        if bases.layout.is_vector(name) or (name.split(".")[-2] not in TARGETS and module != EMBEDDING):
            dropped_sq += float(full.pow(2).sum())
            continue
        allowed = min(seg.length for seg in segs)
        if rank > allowed:
            raise ValueError(f"LoRA rank {rank} exceeds what {name} allows ({allowed}); choose at most {allowed}")
        a_parts, b_parts = [], []
        for seg in segs:
            f = bases.factors[seg.expert]
            g = genome[seg.start : seg.start + rank]
            b_parts.append(f[f"{name}.U"][:, :rank] * (g * f[f"{name}.S"][:rank]))
            a_parts.append(f[f"{name}.V"][:, :rank].T)
        a, b = torch.cat(a_parts, 0).contiguous(), torch.cat(b_parts, 1).contiguous()
        factors[module] = (a, b)
        dropped_sq += float((full - b @ a).pow(2).sum())
    error = (dropped_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0
    return LoraExport(factors, rank * bases.layout.n_experts, error)


def merged_weights(base: dict[str, torch.Tensor], export: LoraExport) -> dict[str, torch.Tensor]:
    """The weights a LoRA engine computes with: the base plus B @ A on every adapted matrix."""
    out = dict(base)
    for module, (a, b) in export.factors.items():
        out[f"{module}.weight"] = base[f"{module}.weight"] + b @ a
    return out


def save_lora(
    bases: Bases, genome: torch.Tensor, rank: int, path: Path, *, base_model: str, tied_lm_head: bool = True
) -> LoraExport:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` at ``path`` (atomically)."""
    export = lora_factors(bases, genome, rank)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tensors = {}
    for module, (a, b) in export.factors.items():
        if module == EMBEDDING:
            # PEFT's embedding LoRA: delta = (B_e @ A_e)^T with A_e (r x vocab), B_e (hidden x r).
            tensors[f"base_model.model.{module}.lora_embedding_A"] = b.T.contiguous()
            tensors[f"base_model.model.{module}.lora_embedding_B"] = a.T.contiguous()
            if tied_lm_head:
                tensors["base_model.model.lm_head.lora_A.weight"] = a
                tensors["base_model.model.lm_head.lora_B.weight"] = b
        else:
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
    targets = list(TARGETS)
    if EMBEDDING in export.factors:
        targets += ["embed_tokens", "lm_head"] if tied_lm_head else ["embed_tokens"]
    save_file(tensors, tmp / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": export.rank,
        "lora_alpha": export.rank,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (tmp / "cycleqd-lora.json").write_text(
        json.dumps({"truncation_error": export.truncation_error, "rank_per_expert": rank})
    )
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return export
