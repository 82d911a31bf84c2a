"""The ``transformers`` engine: in-process batched greedy decoding with a KV cache, weights swapped in place.

Evolution evaluates thousands of children on one model object: :meth:`TransformersEngine.load_genome` writes a
child's weights into the existing parameters (no reallocation, no re-tracing), on the engine's device and in its
dtype, and generation sorts prompts by length so each batch pads little. Any causal LM that
``AutoModelForCausalLM`` loads works; prompts of chat-format skills go through the tokenizer's chat template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from evolve.evaluators.base import cut_at_stop
from evolve.genome import Bases
from evolve.models.hf import Device, DType, load_hf


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of one user turn through the tokenizer's chat template, ready for the assistant's answer.

    Both engines feed these exact ids (the template's text already holds any BOS it wants, so no special tokens
    are added again), which is what makes their greedy outputs comparable token for token.
    """
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def conversation_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a whole conversation through the tokenizer's chat template, ready for the next assistant turn
    (multi-turn episodes: both engines feed these exact ids)."""
    ids = tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def prompt_ids(tokenizer: Any, prompts: Sequence[str], *, chat: bool) -> list[list[int]]:
    if chat:
        return [chat_ids(tokenizer, p) for p in prompts]
    return [tokenizer(p)["input_ids"] for p in prompts]


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token that ends an answer: the generation config's EOS (often a list for chat models) and the
    tokenizer's."""
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(found if isinstance(found, list) else [found] if found is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class TransformersEngine:
    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 64) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self._params = dict(model.named_parameters())
        self._eos = eos_ids(model, tokenizer)
        self._max_len = getattr(model.config, "max_position_embeddings", None) or 1 << 30

    @classmethod
    def from_pretrained(
        cls, path: Path, *, batch_size: int = 64, dtype: DType | str = "float32", device: Device | str = "cpu"
    ) -> TransformersEngine:
        model, tokenizer = load_hf(path, dtype=dtype, device=device)
        return cls(model, tokenizer, batch_size=batch_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Live views of the parameters (tied weights appear once)."""
        return {k: p.data for k, p in self._params.items()}

    @torch.no_grad()
    def load_state_dict(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the engine's weights in place; every parameter must be given, with its exact shape."""
        missing = self._params.keys() - weights.keys()
        if missing:
            raise KeyError(f"weights lack {len(missing)} parameters, e.g. {sorted(missing)[0]!r}")
        for name, p in self._params.items():
            w = weights[name]
            if w.shape != p.shape:
                raise ValueError(f"{name}: shape {tuple(w.shape)} does not match the model's {tuple(p.shape)}")
            p.data.copy_(w)

    def load_genome(self, bases: Bases, genome: torch.Tensor) -> None:
        """Materialise ``genome`` straight into this engine's parameters (no reallocation per child)."""
        bases.to(self.device).materialise_into(genome, self.state_dict())

    def generate(
        self, prompts: Sequence[str], *, max_new_tokens: int, chat: bool = False, stop: Sequence[str] = ()
    ) -> list[str]:
        """Greedy completions, in the order of ``prompts``; generation stops at EOS, the text at ``stop``."""
        ids = self.generate_ids(prompts, max_new_tokens=max_new_tokens, chat=chat)
        return [cut_at_stop(t, stop) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def generate_chat(
        self, conversations: Sequence[Sequence[Mapping[str, str]]], *, max_new_tokens: int, stop: Sequence[str] = ()
    ) -> list[str]:
        """The next assistant turn of each conversation (multi-turn episodes), greedy, in one batch."""
        encoded = [conversation_ids(self.tokenizer, c) for c in conversations]
        ids = self._generate_encoded(encoded, max_new_tokens=max_new_tokens)
        return [cut_at_stop(t, stop) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def generate_ids(self, prompts: Sequence[str], *, max_new_tokens: int, chat: bool = False) -> list[list[int]]:
        """Greedy new token ids per prompt (EOS excluded), in the order of ``prompts``."""
        return self._generate_encoded(prompt_ids(self.tokenizer, prompts, chat=chat), max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def _generate_encoded(self, encoded: Sequence[list[int]], *, max_new_tokens: int) -> list[list[int]]:
        tok = self.tokenizer
        prompts = encoded
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        out: list[list[int]] = [[] for _ in prompts]
        eos = sorted(self._eos)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = tok.pad({"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            limit = min(max_new_tokens, self._max_len - batch["input_ids"].shape[1])
            gen = self.model.generate(
                **batch,
                max_new_tokens=max(limit, 1),
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=eos or None,
            )
            new = gen[:, batch["input_ids"].shape[1] :]
            for i, row in zip(idx, new.tolist(), strict=True):
                stop = next((j for j, t in enumerate(row) if t in self._eos), len(row))
                out[i] = row[:stop]
        return out
