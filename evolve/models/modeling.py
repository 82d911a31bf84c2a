"""Tiny Llama models as plain Hugging Face directories that ``transformers`` and vLLM load unchanged.

A model directory holds ``config.json``, ``model.safetensors``, the tokenizer files and ``cycleqd.json`` (what
the model is: base, expert of a skill, multi-task baseline; how it was trained). Directories are written to a
temporary sibling and renamed into place, so an interrupted save never leaves a half-written model behind and
never damages the one that was there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cycleqd.atomic import atomic_directory
from evolve.models.hf import ModelError, load_hf

META_FILE = "cycleqd.json"
WEIGHTS_FILE = "model.safetensors"

__all__ = ["META_FILE", "WEIGHTS_FILE", "ArchSpec", "ModelError", "load_model", "new_model", "read_meta", "save_model"]


class ArchSpec(BaseModel):
    """Shape of the tiny Llama. The defaults give ~0.9M parameters: minutes to train on two CPU cores."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(128, ge=16)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(384, ge=16)
    max_positions: int = Field(160, ge=32)


def new_model(arch: ArchSpec, tokenizer: PreTrainedTokenizerFast, *, seed: int) -> LlamaForCausalLM:
    if arch.hidden_size % arch.num_heads:
        raise ValueError(f"hidden_size {arch.hidden_size} must be a multiple of num_heads {arch.num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        max_position_embeddings=arch.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path, meta: dict[str, Any]) -> None:
    """Write a complete model directory at ``path`` atomically (replacing an older one only once complete)."""
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise ModelError(f"{meta_path}: missing; {path} is not a model directory written by cycleqd-evolve")
    try:
        return json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{meta_path}: not valid JSON ({exc}); re-run `cycleqd-evolve bootstrap`") from exc


def load_model(path: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load a model directory written by ``cycleqd-evolve`` (it must carry ``cycleqd.json``), in float32.

    Directories from elsewhere load with :func:`evolve.models.hf.load_hf`; both turn every way a directory can
    be broken into a :class:`ModelError` naming the file.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no such model directory; create it with `cycleqd-evolve bootstrap`")
    read_meta(path)
    return load_hf(path, dtype="float32")
