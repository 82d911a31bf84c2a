"""The ``transformers`` engine: in-process batched greedy decoding with a KV cache, weights swapped in place.

Evolution evaluates thousands of children on one model object: :meth:`TransformersEngine.load_state_dict`
copies a child's weights into the existing parameters (no reallocation, no re-tracing), and generation sorts
prompts by length so each batch pads little.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from evolve.genome import Bases
from evolve.models.modeling import load_model


class TransformersEngine:
    def __init__(self, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, *, batch_size: int = 64) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._params = dict(model.named_parameters())

    @classmethod
    def from_pretrained(cls, path: Path, *, batch_size: int = 64) -> TransformersEngine:
        model, tokenizer = load_model(path)
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
        bases.materialise_into(genome, self.state_dict())

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int) -> list[str]:
        """Greedy completions, in the order of ``prompts``; generation stops at EOS."""
        ids = self.generate_ids(prompts, max_new_tokens=max_new_tokens)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[str], *, max_new_tokens: int) -> list[list[int]]:
        """Greedy new token ids per prompt (EOS excluded), in the order of ``prompts``."""
        tok = self.tokenizer
        encoded = [tok(p)["input_ids"] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        out: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = tok.pad({"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt")
            limit = min(max_new_tokens, self.model.config.max_position_embeddings - batch["input_ids"].shape[1])
            gen = self.model.generate(
                **batch,
                max_new_tokens=max(limit, 1),
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            new = gen[:, batch["input_ids"].shape[1] :]
            for i, row in zip(idx, new.tolist(), strict=True):
                out[i] = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        return out
